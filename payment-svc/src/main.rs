//! `payment-svc` binary. Run with `cargo run --bin payment-svc`; `--help`
//! lists the settings (each also read from the environment).

fn main() -> anyhow::Result<()> {
    common::runtime::service::main::<payment_svc::App>()
}
