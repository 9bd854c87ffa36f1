//! `bridge`: run the telemetry-bridge hub, tail live events, and steer workers.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
