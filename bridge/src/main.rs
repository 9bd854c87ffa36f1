//! `bridge`: run the telemetry-bridge hub, tail live events, and steer workers.

mod cli;

/// mimalloc hands memory back to the system once it is free (glibc's allocator keeps what
/// thousands of departed connections used, so the hub's RSS after a spike looked like a leak),
/// and it is faster for the hub's many small, short-lived allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
