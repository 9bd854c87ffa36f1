//! A TCP proxy between workers and a hub that a test or the soak benchmark steers: open or
//! closed, delaying every chunk, black-holing traffic (the connection stays up, nothing gets
//! through), cutting connections cleanly or resetting them, so the caller decides exactly what
//! the network does. Not used by the hub itself.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward as it comes.
    Forward,
    /// Forward each chunk after this delay.
    Delay(Duration),
    /// Keep connections (and accept new ones) but move no bytes: a network partition, as far
    /// as either end can tell.
    Blackhole,
    /// Accept and immediately drop new connections.
    Refuse,
}

/// How in-flight connections end when the test cuts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Close,
    Reset,
}

#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    cuts: watch::Sender<(u64, Cut)>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards to `target` if `open`, refuses connections otherwise.
    pub async fn start(target: SocketAddr, open: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(if open { Mode::Forward } else { Mode::Refuse });
        let (cuts, _) = watch::channel((0u64, Cut::Close));
        let task = {
            let (mode, cuts) = (mode.clone(), cuts.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *mode.borrow() == Mode::Refuse {
                        drop(client);
                        continue;
                    }
                    let (mode, cut) = (mode.subscribe(), cuts.subscribe());
                    tokio::spawn(async move {
                        let Ok(upstream) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                        let (client_in, client_out) = client.into_split();
                        let (upstream_in, upstream_out) = upstream.into_split();
                        tokio::join!(
                            pump(client_in, upstream_out, mode.clone(), cut.clone()),
                            pump(upstream_in, client_out, mode, cut),
                        );
                    });
                }
            })
        };
        Ok(Self {
            addr,
            mode,
            cuts,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Forwards again.
    pub fn open(&self) {
        self.set(Mode::Forward);
    }

    /// Refuses new connections and closes the ones in flight.
    pub fn close(&self) {
        self.set(Mode::Refuse);
        self.cuts
            .send_modify(|(n, cut)| (*n, *cut) = (*n + 1, Cut::Close));
    }

    /// Resets the connections in flight (RST, as a crashed peer or middlebox would); new ones
    /// are served as the mode says.
    pub fn reset(&self) {
        self.cuts
            .send_modify(|(n, cut)| (*n, *cut) = (*n + 1, Cut::Reset));
    }
}

/// Copies one direction of a connection as `mode` says, until either side closes or the
/// connection is cut.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    mut cut: watch::Receiver<(u64, Cut)>,
) {
    cut.mark_unchanged();
    let mut buf = vec![0u8; 16 * 1024];
    let ended = loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break None,
                Ok(n) => n,
            },
            _ = cut.changed() => break Some(current_cut(&cut)),
        };
        // During a partition the chunk just read is held, and nothing more is read, until it
        // heals, as TCP would.
        while current_mode(&mode) == Mode::Blackhole {
            tokio::select! {
                changed = mode.changed() => if changed.is_err() { return },
                _ = cut.changed() => {
                    finish(&to, current_cut(&cut));
                    return;
                }
            }
        }
        if let Mode::Delay(delay) = current_mode(&mode) {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break None;
        }
    };
    if let Some(how) = ended {
        finish(&to, how);
    }
}

/// The mode now, without holding the channel's lock (across an await it would not be `Send`).
fn current_mode(mode: &watch::Receiver<Mode>) -> Mode {
    *mode.borrow()
}

fn current_cut(cut: &watch::Receiver<(u64, Cut)>) -> Cut {
    cut.borrow().1
}

fn finish(to: &OwnedWriteHalf, how: Cut) {
    if how == Cut::Reset {
        // Closing with a zero linger sends RST instead of FIN.
        let _ = to.as_ref().set_zero_linger();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
