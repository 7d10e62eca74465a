//! `magento-devserver`: the dev server as a process of its own, for the benchmarks (which measure
//! the shipped sidecar, built without it) and for manual use. Prints `listening on URL`, serves
//! until SIGTERM or Ctrl-C.

use clap::Parser;

#[derive(Parser)]
#[command(name = "magento-devserver", version, about = "A Magento 2.4 customer-token API stand-in on loopback")]
struct Cli {
    #[command(flatten)]
    args: magento_devserver::DevServerArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("magento-devserver: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let stop = async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        match magento_devserver::run_cli(cli.args, stop).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("magento-devserver: {e}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}
