//! Runs one of the four services as a process, exactly as its own binary
//! does (`saga-service order-svc [flags]` = `order-svc [flags]`). The chaos
//! test uses it to run real processes it can SIGKILL, without depending on
//! the service binaries having been built.

use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let service = args.next().unwrap_or_default();
    let argv = std::iter::once(service.clone()).chain(args);
    match service.as_str() {
        "order-svc" => common::runtime::service::main_with::<order_svc::App>(
            order_svc::Config::parse_from(argv),
        ),
        "payment-svc" => common::runtime::service::main_with::<payment_svc::App>(
            payment_svc::Config::parse_from(argv),
        ),
        "inventory-svc" => common::runtime::service::main_with::<inventory_svc::App>(
            inventory_svc::Config::parse_from(argv),
        ),
        "notification-svc" => common::runtime::service::main_with::<notification_svc::App>(
            notification_svc::Config::parse_from(argv),
        ),
        other => anyhow::bail!(
            "usage: saga-service <order-svc|payment-svc|inventory-svc|notification-svc> [flags]; got {other:?}"
        ),
    }
}
