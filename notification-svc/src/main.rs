//! `notification-svc` binary. Run with `cargo run --bin notification-svc`;
//! `--help` lists the settings (each also read from the environment).

fn main() -> anyhow::Result<()> {
    common::runtime::service::main::<notification_svc::App>()
}
