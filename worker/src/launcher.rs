//! Starts the app so that it dies with the sidecar (Linux).
//!
//! A sidecar that was SIGKILLed or crashed cannot forward signals, and its app must not run on
//! as an orphan nobody reports. The kernel's parent-death signal (`PR_SET_PDEATHSIG`) does it,
//! but it must be armed in the child before the app's program runs, and this crate has no
//! `unsafe` for a `pre_exec` hook. So the sidecar starts its own binary with [`MARKER`]: that
//! process arms SIGKILL as its parent-death signal, checks that the sidecar is still its
//! parent, and `exec`s the app in its place (same pid; the signal survives `exec`).

use std::{ffi::OsString, process::ExitCode};

/// The first argument that makes the `worker` binary a launcher rather than a sidecar.
pub const MARKER: &str = "__worker-launch-app";

/// The command that runs `app` as a child that dies with this process; on systems without a
/// parent-death signal (or without a path to this binary), `app` itself.
pub fn command(app: &[OsString]) -> tokio::process::Command {
    match std::env::current_exe() {
        Ok(this) if cfg!(target_os = "linux") => {
            let mut command = tokio::process::Command::new(this);
            command
                .arg(MARKER)
                .arg(std::process::id().to_string())
                .args(app);
            command
        }
        _ => {
            let mut command = tokio::process::Command::new(&app[0]);
            command.args(&app[1..]);
            command
        }
    }
}

/// When this process was started by [`command`]: arms the signal and becomes the app (or
/// exits 127 saying why it cannot). `None` for a normal start.
pub fn run_if_launcher() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != MARKER {
        return None;
    }
    let parent: u32 = args.next()?.to_str()?.parse().ok()?;
    let app: Vec<OsString> = args.collect();
    let Some(program) = app.first() else {
        eprintln!("worker: no app to run");
        return Some(ExitCode::from(127));
    };
    arm(parent);
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new(program).args(&app[1..]).exec();
    eprintln!(
        "worker: cannot run `{}`: {error}",
        program.to_string_lossy()
    );
    Some(ExitCode::from(127))
}

#[cfg(target_os = "linux")]
fn arm(parent: u32) {
    use nix::{sys::signal::Signal, unistd::getppid};
    if let Err(error) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("worker: the app will not die with the sidecar: {error}");
    }
    // The sidecar died before the signal was armed: nothing would ever send it.
    if u32::try_from(getppid().as_raw()).ok() != Some(parent) {
        std::process::exit(128 + Signal::SIGKILL as i32);
    }
}

#[cfg(not(target_os = "linux"))]
fn arm(_parent: u32) {}
