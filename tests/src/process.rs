//! The four services as real processes, in a [`Sandbox`]: for the chaos
//! test, which kills them with SIGKILL and restarts them.
//!
//! Each replica runs `saga-service <service>` (the services' own `main`)
//! with its own fixed port, so its URL stays valid across restarts. Output
//! goes to `<temp dir>/<prefix>/<service>-<n>.log`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{Sandbox, Svc, wait_for_health};

/// One process of one service.
pub struct Replica {
    pub svc: Svc,
    pub port: u16,
    pub log: PathBuf,
    /// How many times it was started.
    pub starts: u32,
    /// Environment of this replica only, on top of the system's.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Replica {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    pub fn name(&self) -> String {
        format!("{}:{}", self.svc.identity().name, self.port)
    }
}

/// Service processes sharing one sandbox.
pub struct ProcessSystem {
    pub sandbox: Sandbox,
    /// The `saga-service` binary (`env!("CARGO_BIN_EXE_saga-service")`).
    bin: PathBuf,
    pub replicas: Vec<Replica>,
    env: Vec<(String, String)>,
    pub log_dir: PathBuf,
}

impl std::ops::Deref for ProcessSystem {
    type Target = Sandbox;

    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

/// Appends a line to `harness.log` in the log directory.
fn harness_log(dir: &std::path::Path, line: &str) {
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("harness.log"))
    {
        let _ = writeln!(f, "{} {line}", chrono::Utc::now().format("%H:%M:%S%.3f"));
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl ProcessSystem {
    /// Starts `n` replicas of each listed service, with `env` added to each
    /// process's environment, and waits until all are healthy.
    pub async fn spawn(bin: &str, layout: &[(Svc, usize)], env: &[(&str, &str)]) -> ProcessSystem {
        Self::spawn_with(bin, layout, env, &[]).await
    }

    /// [`ProcessSystem::spawn`], with `(service, key, value)` added to the
    /// environment of every replica of that service (e.g. a failpoint).
    pub async fn spawn_with(
        bin: &str,
        layout: &[(Svc, usize)],
        env: &[(&str, &str)],
        service_env: &[(Svc, &str, &str)],
    ) -> ProcessSystem {
        let sandbox = Sandbox::new().await;
        let log_dir = std::env::temp_dir().join(&sandbox.prefix);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let mut replicas = Vec::new();
        for &(svc, n) in layout {
            for i in 0..n {
                replicas.push(Replica {
                    svc,
                    port: free_port(),
                    log: log_dir.join(format!("{}-{i}.log", svc.identity().name)),
                    starts: 0,
                    env: service_env
                        .iter()
                        .filter(|(s, _, _)| *s == svc)
                        .map(|(_, k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    child: None,
                });
            }
        }
        let mut system = ProcessSystem {
            sandbox,
            bin: bin.into(),
            replicas,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            log_dir,
        };
        // Start one replica of each service first, so that database
        // creation and migrations happen once, then the others.
        let mut first = Vec::new();
        for svc in Svc::ALL {
            if let Some(i) = system.replicas.iter().position(|r| r.svc == svc) {
                first.push(i);
                system.start(i).await;
            }
        }
        for &i in &first {
            system.wait_healthy(i).await;
        }
        for i in 0..system.replicas.len() {
            if !first.contains(&i) {
                system.start(i).await;
            }
        }
        for i in 0..system.replicas.len() {
            system.wait_healthy(i).await;
        }
        system
    }

    /// URLs of every replica of `svc`.
    pub fn urls(&self, svc: Svc) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|r| r.svc == svc)
            .map(Replica::url)
            .collect()
    }

    /// Starts replica `i` (again).
    pub async fn start(&mut self, i: usize) {
        let db = self.sandbox.database_url(self.replicas[i].svc);
        // order-svc asks the others for their steps of a saga (a replica of each).
        let peers: Vec<(&str, String)> = if self.replicas[i].svc == Svc::Order {
            [
                ("PAYMENT_SVC_URL", Svc::Payment),
                ("INVENTORY_SVC_URL", Svc::Inventory),
                ("NOTIFICATION_SVC_URL", Svc::Notification),
            ]
            .into_iter()
            .filter_map(|(var, svc)| Some((var, self.urls(svc).into_iter().next()?)))
            .collect()
        } else {
            Vec::new()
        };
        let r = &mut self.replicas[i];
        assert!(r.child.is_none(), "{} is running", r.name());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log)
            .expect("open log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg(r.svc.identity().name)
            .env("AMQP_URL", &self.sandbox.amqp_nodes)
            .env("DATABASE_URL", db)
            .env("HTTP_ADDR", format!("127.0.0.1:{}", r.port))
            .env("DEV_MODE", "1")
            .envs(peers)
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_RUST_LOG").unwrap_or_else(|_| "warn,common=info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(r.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn saga-service");
        harness_log(
            &self.log_dir,
            &format!("started {} pid {:?}", r.name(), child.id()),
        );
        r.child = Some(child);
        r.starts += 1;
    }

    /// SIGKILL: no cleanup, no flush — as a crash.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.replicas[i].child.take() {
            harness_log(
                &self.log_dir,
                &format!("SIGKILL {} pid {:?}", self.replicas[i].name(), child.id()),
            );
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// SIGTERM, then waits for the exit: `Ok(())` for exit code 0, else
    /// how it ended (a stack dump of a process that hangs goes next to its log).
    pub async fn terminate(&mut self, i: usize) -> Result<(), String> {
        let Some(mut child) = self.replicas[i].child.take() else {
            return Ok(());
        };
        let pid = child.id().ok_or("no pid")?;
        harness_log(
            &self.log_dir,
            &format!("SIGTERM {} pid {pid}", self.replicas[i].name()),
        );
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => {
                use std::os::unix::process::ExitStatusExt as _;
                Err(format!(
                    "exit code {:?}, signal {:?}",
                    status.code(),
                    status.signal()
                ))
            }
            Ok(Err(e)) => Err(format!("wait failed: {e}")),
            Err(_) => {
                let dump = Command::new("gdb")
                    .args([
                        "-p",
                        &pid.to_string(),
                        "-batch",
                        "-ex",
                        "thread apply all bt 20",
                    ])
                    .output()
                    .await
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let _ = std::fs::write(self.replicas[i].log.with_extension("hang.txt"), dump);
                let _ = child.start_kill();
                Err("still running 30 s after SIGTERM".into())
            }
        }
    }

    /// Waits up to `timeout` for replica `i` to exit on its own (a crash);
    /// its exit status, or `None` if it is still running.
    pub async fn wait_exit(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let child = self.replicas[i].child.as_mut()?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .ok()?
            .ok()?;
        harness_log(
            &self.log_dir,
            &format!("{} exited: {status}", self.replicas[i].name()),
        );
        self.replicas[i].child = None;
        Some(status)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.replicas[i].child.is_some()
    }

    /// Waits until replica `i` answers `/health` with 200.
    pub async fn wait_healthy(&self, i: usize) {
        let r = &self.replicas[i];
        wait_for_health(
            &self.sandbox.http,
            &r.url(),
            &r.name(),
            Duration::from_secs(60),
        )
        .await;
    }

    /// SIGTERM to every replica (once healthy); returns the replicas that
    /// did not exit 0.
    pub async fn stop_all(&mut self) -> Vec<String> {
        let mut unclean = Vec::new();
        for i in 0..self.replicas.len() {
            if self.is_running(i) {
                self.wait_healthy(i).await;
            }
            if self.is_running(i)
                && let Err(how) = self.terminate(i).await
            {
                unclean.push(format!("{} on SIGTERM: {how}", self.replicas[i].name()));
            }
        }
        unclean
    }
}
