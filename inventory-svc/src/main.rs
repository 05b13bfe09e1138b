//! `inventory-svc` binary. Run with `cargo run --bin inventory-svc`;
//! `--help` lists the settings (each also read from the environment).

fn main() -> anyhow::Result<()> {
    common::runtime::service::main::<inventory_svc::App>()
}
