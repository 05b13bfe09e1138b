//! `order-svc` binary. Run with `cargo run --bin order-svc`; `--help` lists
//! the settings (each also read from the environment).

fn main() -> anyhow::Result<()> {
    common::runtime::service::main::<order_svc::App>()
}
