//! `sagactl`, the operator CLI of the order saga: places orders, shows and
//! lists sagas, inspects, replays and purges parked messages, lists and
//! retries escalations. See docs/sagactl.md.

mod api;
mod broker;
mod dlq;
mod escalations;
mod failure;
mod output;
mod sagas;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::failure::Failure;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error: a service or the broker unreachable or failing, an unexpected
     answer, a purge not confirmed, a conflict (escalation already resolved)
  2  usage: bad arguments, or a request the service refused as invalid (400)
  3  not found: unknown saga, escalation or parked message
  4  refused: missing or wrong token (401), the admin token needed (403), or
     broker credentials that may not do this (a replay needing another user)
  5  `order place` only: the order was placed but failed, or was refused
     (the result dict is printed either way)

Admin commands (`escalations …`) need the ADMIN token; the API token is
enough for `order` and `saga`. The admin token works for all of them.";

/// The operator CLI of the order saga.
#[derive(Debug, Parser)]
#[command(name = "sagactl", version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Where the services and the broker are, and how to talk to them.
#[derive(Debug, Args)]
struct Global {
    /// order-svc's base URL.
    #[arg(
        long = "api",
        env = "SAGA_API_URL",
        global = true,
        default_value = "http://127.0.0.1:8080"
    )]
    order_url: String,
    /// payment-svc's base URL (escalations).
    #[arg(
        long,
        env = "PAYMENT_SVC_URL",
        global = true,
        default_value = "http://127.0.0.1:8081"
    )]
    payment_url: String,
    /// inventory-svc's base URL (escalations).
    #[arg(
        long,
        env = "INVENTORY_SVC_URL",
        global = true,
        default_value = "http://127.0.0.1:8082"
    )]
    inventory_url: String,
    /// notification-svc's base URL (escalations).
    #[arg(
        long,
        env = "NOTIFICATION_SVC_URL",
        global = true,
        default_value = "http://127.0.0.1:8083"
    )]
    notification_url: String,
    /// Bearer token sent with every request: the API token for `order` and
    /// `saga`, the admin token for `escalations` (it also works for the rest).
    #[arg(long, env = "SAGA_API_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The broker (`dlq` commands), with the user to connect as.
    #[arg(
        long,
        env = "AMQP_URL",
        global = true,
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Seconds an HTTP request may take (placing an order waits for its
    /// saga's decision).
    #[arg(
        long,
        env = "SAGACTL_TIMEOUT_SECS",
        global = true,
        default_value_t = 30
    )]
    timeout_secs: u64,
    /// Print raw JSON (for scripts) instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Orders.
    #[command(subcommand)]
    Order(OrderCmd),
    /// Sagas: timelines, searches, invariant violations.
    #[command(subcommand)]
    Saga(SagaCmd),
    /// Parked (dead-lettered) messages in the `<service>.parking` queues.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Compensations that kept failing (needs the admin token).
    #[command(subcommand)]
    Escalations(EscalationsCmd),
    /// Broker set-up for confined service users (as an administrator).
    #[command(subcommand)]
    Broker(BrokerCmd),
}

#[derive(Debug, Subcommand)]
enum BrokerCmd {
    /// Declares the exchanges and every service's queues and bindings
    /// (AMQP_URL must be an administrator of the vhost). Run before the
    /// services start as their own confined users, and after an upgrade.
    Setup {
        /// The kind of the work, delay and parking queues (the services'
        /// `QUEUE_TYPE`).
        #[arg(long, env = "QUEUE_TYPE", default_value = "quorum")]
        queue_type: common::messaging::topology::QueueType,
        /// Also create (or update) every user `broker permissions` lists,
        /// each with the password in the file of its name in DIR, and set
        /// its permissions (through the management API).
        #[arg(long, value_name = "DIR")]
        users_from: Option<std::path::PathBuf>,
        /// The management API, for `--users-from`.
        #[arg(
            long,
            env = "RABBITMQ_MANAGEMENT_URL",
            default_value = "http://127.0.0.1:15672"
        )]
        management_url: String,
        /// Put before every user's name, for `--users-from` (several
        /// systems on one broker); PRODUCER_USERS must then name them so.
        #[arg(long, default_value = "")]
        user_prefix: String,
    },
    /// Prints the permissions each broker user needs, tab-separated (see
    /// scripts/broker-users.sh).
    Permissions,
}

#[derive(Debug, Subcommand)]
enum OrderCmd {
    /// Places an order (the order dict as JSON, from FILE or `-` for stdin)
    /// and prints the result dict. Exit 5 if the order failed.
    Place {
        /// A file with the order dict, or `-` for stdin.
        file: String,
        /// Idempotency-Key: placing again with the same key never creates
        /// a second order.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SagaCmd {
    /// A saga's timeline and decision.
    Show {
        /// The order id.
        order_id: String,
    },
    /// Recent sagas, newest first.
    List {
        /// Only sagas still undecided past their deadline.
        #[arg(long)]
        stuck: bool,
        /// Only sagas with this status: PENDING, CONFIRMED or FAILED.
        #[arg(long)]
        status: Option<String>,
        /// Only sagas created at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// At most this many (1-500).
        #[arg(long)]
        limit: Option<u32>,
        /// List the invariant violations found instead of sagas.
        #[arg(long, conflicts_with_all = ["stuck", "status", "since"])]
        violations: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// Parked messages per parking queue (read without consuming them).
    List {
        /// Only this service's parking queue.
        #[arg(long)]
        service: Option<String>,
        /// Messages read per queue at most (the count is always complete).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// One parked message: properties, headers and body (bodies are
    /// redacted of card data by the service that parked them).
    Show {
        /// Its AMQP message_id, or `#N` for the N-th message of its queue as
        /// `dlq list` numbers them (for messages without a message_id).
        message_id: String,
        /// Only look in this service's parking queue.
        #[arg(long)]
        service: Option<String>,
    },
    /// Re-publishes parked messages to be handled again (after the cause is
    /// fixed), then removes them from the parking queue. Idempotent: the
    /// services recognise what they already applied.
    Replay {
        /// The message_id (or `#N`) of the message to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        message_id: Option<String>,
        /// Replay every message parked at the service.
        #[arg(long)]
        all: bool,
        /// The service whose parking queue holds the message(s).
        #[arg(long)]
        service: String,
    },
    /// Deletes every message parked at a service (asks to type the service
    /// name to confirm).
    Purge {
        /// The service whose parking queue to empty.
        #[arg(long)]
        service: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum EscalationsCmd {
    /// Escalations of every service (or one).
    List {
        /// Only this service's.
        #[arg(long)]
        service: Option<String>,
        /// Only those with this status: open, retrying or resolved.
        #[arg(long)]
        status: Option<String>,
    },
    /// Retries an escalated compensation (once its cause is fixed).
    Retry {
        /// The escalation id.
        id: String,
        /// The service that recorded it (otherwise each is asked).
        #[arg(long)]
        service: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("sagactl: error: cannot start the runtime: {error}");
            return ExitCode::from(Failure::EXIT_ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let code = failure::exit_code(&error);
            if code != Failure::EXIT_ORDER_FAILED {
                eprintln!("sagactl: error: {error:#}");
            }
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = cli.global;
    let api = api::Api::new(
        api::Urls {
            order: g.order_url,
            payment: g.payment_url,
            inventory: g.inventory_url,
            notification: g.notification_url,
        },
        g.token,
        Duration::from_secs(g.timeout_secs.max(1)),
    )?;
    let json = g.json;
    match cli.command {
        Command::Order(OrderCmd::Place {
            file,
            idempotency_key,
        }) => sagas::place(&api, &file, idempotency_key.as_deref()).await,
        Command::Saga(SagaCmd::Show { order_id }) => sagas::show(&api, &order_id, json).await,
        Command::Saga(SagaCmd::List {
            stuck,
            status,
            since,
            limit,
            violations,
        }) => {
            if violations {
                sagas::violations(&api, limit, json).await
            } else {
                let search = sagas::Search {
                    stuck,
                    status,
                    since,
                    limit,
                };
                sagas::list(&api, &search, json).await
            }
        }
        Command::Dlq(cmd) => {
            let broker = dlq::Broker::new(g.amqp_url);
            match cmd {
                DlqCmd::List { service, limit } => {
                    dlq::list(&broker, service.as_deref(), limit, json).await
                }
                DlqCmd::Show {
                    message_id,
                    service,
                } => dlq::show(&broker, &message_id, service.as_deref(), json).await,
                DlqCmd::Replay {
                    message_id,
                    all,
                    service,
                } => {
                    let which = match (all, message_id) {
                        (true, _) => dlq::Selection::All,
                        (false, Some(id)) => dlq::Selection::One(id),
                        (false, None) => {
                            return Err(Failure::Usage(
                                "name a MESSAGE_ID to replay, or --all".into(),
                            )
                            .into());
                        }
                    };
                    dlq::replay(&broker, &service, &which, json).await
                }
                DlqCmd::Purge { service, yes } => dlq::purge(&broker, &service, yes, json).await,
            }
        }
        Command::Escalations(EscalationsCmd::List { service, status }) => {
            escalations::list(&api, service.as_deref(), status.as_deref(), json).await
        }
        Command::Escalations(EscalationsCmd::Retry { id, service }) => {
            escalations::retry(&api, &id, service.as_deref(), json).await
        }
        Command::Broker(BrokerCmd::Setup {
            queue_type,
            users_from,
            management_url,
            user_prefix,
        }) => {
            let users = users_from.as_deref().map(|passwords| broker::Users {
                passwords,
                management_url: &management_url,
                prefix: &user_prefix,
            });
            broker::setup(&g.amqp_url, queue_type, users).await
        }
        Command::Broker(BrokerCmd::Permissions) => {
            broker::print_permissions();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
