//! `bridge top` in a real terminal (tmux): it lists a live worker, changes its sampling rate
//! and toggles it from the keyboard, shows the worker's acknowledgement, and quits cleanly; its
//! models view shows a simulated worker's model at the rate it serves.

use std::{
    process::{Command, Output},
    time::Duration,
};

use bridge_tests::{
    HubProcess, WorkerProcess, bin, eventually, run_cli, skip_without, worker_info,
};

const WAIT: Duration = Duration::from_secs(20);

/// A tmux server of the test's own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// `bridge top` against `hub` in a 160x24 terminal of its own; `name` tells tests apart.
    fn top(hub: &HubProcess, name: &str) -> Self {
        Self::top_with(hub, name, "")
    }

    /// [`Tmux::top`], with more arguments to `bridge top`.
    fn top_with(hub: &HubProcess, name: &str, args: &str) -> Self {
        let tmux = Tmux {
            socket: format!("bridge-top-{name}-{}", std::process::id()),
        };
        // The shell's `sleep` keeps the pane, so that a test can see top exit cleanly.
        let command = format!(
            "{} --hub {} top --interval 200ms {args}; sleep 30",
            bin("bridge").display(),
            hub.url
        );
        let started = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "160",
            "-y",
            "24",
            &command,
        ]);
        assert!(started.status.success(), "{started:?}");
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success(), "send-keys {keys:?}");
    }

    async fn wait_for_screen(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        eventually(what, WAIT, || async {
            let screen = tokio::task::block_in_place(|| self.screen());
            check(&screen).then_some(screen)
        })
        .await
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn tmux_installed() -> bool {
    let found = Command::new("tmux").arg("-V").output().is_ok();
    if !found {
        skip_without(
            "BRIDGE_REQUIRE_TMUX",
            "no tmux (Debian package tmux) for the `bridge top` test",
        );
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_changes_a_workers_sampling_and_shows_it_applied() {
    if !tmux_installed() {
        return;
    }
    let hub = HubProcess::start();
    let _worker = WorkerProcess::start(&hub.url, "gpu-3", "llama", &["--simulate", "20"]);
    let mut client = hub.client().await;
    eventually("gpu-3 to connect", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "gpu-3")
                .await
                .filter(|w| w.connected)
        }
    })
    .await;
    let tmux = Tmux::top(&hub, "sampling");
    tmux.wait_for_screen("top to list gpu-3", |s| {
        s.contains("gpu-3") && s.contains("llama") && s.contains("1 applied")
    })
    .await;

    tmux.keys(&["r"]);
    tmux.wait_for_screen("the rate prompt", |s| s.contains("sampling rate for gpu-3"))
        .await;
    tmux.keys(&["0.25", "Enter"]);
    let screen = tmux
        .wait_for_screen("the acknowledgement", |s| {
            s.contains("gpu-3: sampling 0.25 applied in")
        })
        .await;
    let info = worker_info(&mut client, "gpu-3").await.expect("gpu-3");
    assert_eq!(
        info.control.as_ref().map(|c| c.sampling_rate),
        Some(0.25),
        "{screen}"
    );
    assert!(info.applied_version >= Some(info.desired_version));
    tmux.wait_for_screen("the table to show the rate applied", |s| {
        s.contains("0.25 applied")
    })
    .await;

    // A rate out of range is refused in the view and never sent.
    let version = info.desired_version;
    tmux.keys(&["r", "2", "Enter"]);
    tmux.wait_for_screen("the refusal", |s| s.contains("`2` is not a sampling rate"))
        .await;
    let info = worker_info(&mut client, "gpu-3").await.expect("gpu-3");
    assert_eq!(info.desired_version, version);

    tmux.keys(&["t"]);
    tmux.wait_for_screen("telemetry off acknowledged", |s| {
        s.contains("gpu-3: telemetry off applied in")
    })
    .await;
    let info = worker_info(&mut client, "gpu-3").await.expect("gpu-3");
    assert_eq!(info.control.as_ref().map(|c| c.enabled), Some(false));

    // q leaves the view and restores the terminal: the shell's `sleep` runs on a clean screen.
    tmux.keys(&["q"]);
    tmux.wait_for_screen("top to exit", |s| !s.contains("WORKER"))
        .await;
}

/// A simulated worker's GPU shows as a utilisation percent: the simulator emits the documented
/// `gpu.metrics` / `utilization_gpu_percent` that top reads, not names of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_a_simulated_workers_gpu_utilisation() {
    if !tmux_installed() {
        return;
    }
    let hub = HubProcess::start();
    let _worker = WorkerProcess::start(&hub.url, "gpu-5", "llama", &["--simulate", "5"]);
    let tmux = Tmux::top(&hub, "gpu");
    // GPU is the last column outside cluster mode.
    let gpu_cell = |screen: &str| {
        let row = screen.lines().find(|l| l.contains("gpu-5"))?;
        row.split_whitespace().last().map(str::to_owned)
    };
    let screen = tmux
        .wait_for_screen("gpu-5 with a GPU utilisation", |s| {
            gpu_cell(s)
                .and_then(|cell| cell.strip_suffix('%')?.parse::<u8>().ok())
                .is_some_and(|percent| percent <= 100)
        })
        .await;
    assert!(screen.contains("GPU"), "{screen}");
}

/// The models view estimates the traffic served, not the part of it sampled: a simulated worker
/// serves 100 requests/s of its model, sampled at 0.2, and top shows about 100 requests/s (20
/// would be the sampled events unweighted) with a p50 duration, from the `inference.stop` events
/// `worker --simulate` (and so `bridge demo`) emits without any flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_a_sampled_workers_model_at_the_rate_it_serves() {
    if !tmux_installed() {
        return;
    }
    const MODEL: &str = "llama-3-8b";
    let hub = HubProcess::start();
    let _worker = WorkerProcess::start(
        &hub.url,
        "gpu-7",
        "llama",
        &["--simulate", "100", "--model", MODEL],
    );
    let client = hub.client().await;
    eventually("gpu-7 to connect", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "gpu-7")
                .await
                .filter(|w| w.connected)
        }
    })
    .await;
    // Waits for the worker's acknowledgement: every event top sees is sampled at 0.2.
    let sampled = run_cli(&hub.url, &["sample", "gpu-7", "0.2"]).await;
    assert_eq!(sampled.code, Some(0), "{sampled:?}");

    let tmux = Tmux::top(&hub, "models");
    tmux.wait_for_screen("the key to the models view", |s| s.contains("Tab/m models"))
        .await;
    tmux.keys(&["m"]);
    // POOL MODEL REQ/S ERRORS P50 P99 TTFT-P50 ...
    let cells = |screen: &str| -> Option<Vec<String>> {
        let row = screen
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(MODEL))?;
        Some(row.split_whitespace().map(str::to_owned).collect())
    };
    let screen = tmux
        .wait_for_screen("llama-3-8b at about 100 requests/s, with a p50", |s| {
            cells(s).is_some_and(|cells| {
                let rate = cells[2].parse::<f64>().unwrap_or(0.0);
                (50.0..=200.0).contains(&rate) && cells[4].ends_with("ms")
            })
        })
        .await;
    assert!(
        screen.contains("REQ/S") && screen.contains("Tab/w workers"),
        "{screen}"
    );
    let row = cells(&screen).expect("the model's row");
    assert_eq!(row[0], "llama", "{screen}");

    tmux.keys(&["Tab"]);
    tmux.wait_for_screen("the workers view again", |s| {
        s.contains("WORKER") && s.contains("gpu-7")
    })
    .await;
}
