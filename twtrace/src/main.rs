//! twtrace entry point: parse arguments, run the command, turn errors into exit codes.

use std::process::ExitCode;

use clap::Parser as _;
use twtrace::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new().filter_level(level).parse_env("TWTRACE_LOG").init();

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("twtrace: error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Trace(args) => twtrace::cmd::trace::trace(args, cli.verbose).await,
            Command::Record(args) => twtrace::cmd::trace::record(args, cli.verbose).await,
            Command::Replay(args) => twtrace::cmd::replay::replay(args),
            Command::Export(args) => twtrace::cmd::replay::export(args),
            Command::Top(args) => twtrace::cmd::pressure::top(args, cli.verbose).await,
            Command::Report(args) => twtrace::cmd::pressure::report(args),
            Command::Serve(args) => twtrace::cmd::serve::serve(args, cli.verbose).await,
            Command::Completions { shell } => {
                let mut cmd = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut cmd, "twtrace", &mut std::io::stdout());
                Ok(())
            }
            Command::Man => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut std::io::stdout())
                .map_err(Into::into),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twtrace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A closed stdout (`twtrace trace | head`) is a normal way to stop.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
