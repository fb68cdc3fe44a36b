//! Catching SIGTERM and SIGINT. All platform code for signals lives in this file.
//!
//! One owner per process: whatever asks for signals first ([`catch_signals`],
//! [`shutdown_signal`], [`Pool::run_until_signal`]) installs the handlers, once; every later
//! listener joins the same count instead of installing its own. Signals are counted on a
//! dedicated thread (signal-hook's iterator), so escalation works even when the tokio runtime is
//! wedged; the last step, the forced exit, happens inside the signal handler itself
//! (signal-hook's conditional shutdown). The exit comes at the third signal once a pool
//! listens (1st drains, 2nd skips the wait), at the second when only [`shutdown_signal`] does;
//! a listener that joins late is told of every signal counted before it.
//!
//! Nothing is installed until something asks.
//!
//! [`Pool::run_until_signal`]: crate::Pool::run_until_signal

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

/// A signal that asks the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Signal {
    /// SIGTERM, what Kubernetes, systemd and docker send.
    Terminate,
    /// SIGINT, what Ctrl-C sends.
    Interrupt,
}

impl Signal {
    /// The signal's number (15 or 2 on Linux).
    pub fn number(self) -> i32 {
        imp::number(self)
    }

    /// The exit status of a process killed by this signal: 128 plus its number.
    pub fn exit_status(self) -> i32 {
        128 + self.number()
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
        })
    }
}

/// Whoever listens to the process's signals: `on_signal(count, signal)` for every one.
type Listener = Box<dyn FnMut(u32, Signal) + Send>;

/// The process's one signal owner: the count, and who listens.
struct Owner {
    state: Mutex<Counted>,
    /// What arms the in-handler exit, shared with the platform code.
    armed: imp::Armed,
}

struct Counted {
    count: u32,
    last: Option<Signal>,
    /// The signal that exits at once (0: none until a listener says).
    exit_at: u32,
    listeners: Vec<Listener>,
}

static OWNER: OnceLock<Result<Owner, (io::ErrorKind, String)>> = OnceLock::new();

fn owner() -> io::Result<&'static Owner> {
    let owner = OWNER.get_or_init(|| {
        let armed = imp::Armed::default();
        imp::install(&armed, counted).map_err(|e| (e.kind(), e.to_string()))?;
        Ok(Owner {
            state: Mutex::new(Counted {
                count: 0,
                last: None,
                exit_at: 0,
                listeners: Vec::new(),
            }),
            armed,
        })
    });
    owner
        .as_ref()
        .map_err(|(kind, text)| io::Error::new(*kind, text.clone()))
}

/// On the signal thread: counts `signal`, exits if this one is the last straw, tells everyone.
fn counted(signal: Signal) {
    let Some(Ok(owner)) = OWNER.get() else {
        return;
    };
    let mut state = owner.state.lock().unwrap_or_else(PoisonError::into_inner);
    state.count = state.count.saturating_add(1);
    state.last = Some(signal);
    let count = state.count;
    if state.exit_at != 0 && count >= state.exit_at {
        // Two signals raced past the arming: exit here instead.
        imp::exit(signal);
    }
    owner
        .armed
        .set(state.exit_at != 0 && count + 1 >= state.exit_at);
    tracing::debug!(%signal, count, "signal received");
    for listener in &mut state.listeners {
        listener(count, signal);
    }
}

/// Joins the process's signal count (installing the handlers if nothing has yet).
/// `on_signal(count, signal)` runs on the signal thread for every signal, counted from the
/// first the process received, and at once for those received before. The signal numbered
/// `exit_at` (or the highest any listener asked for) makes the process exit at once with 128 +
/// its number, from inside the signal handler.
pub(crate) fn listen(
    exit_at: u32,
    mut on_signal: impl FnMut(u32, Signal) + Send + 'static,
) -> io::Result<()> {
    let owner = owner()?;
    let mut state = owner.state.lock().unwrap_or_else(PoisonError::into_inner);
    state.exit_at = state.exit_at.max(exit_at);
    owner
        .armed
        .set(state.exit_at != 0 && state.count + 1 >= state.exit_at);
    if let Some(last) = state.last {
        for count in 1..=state.count {
            on_signal(count, last);
        }
    }
    state.listeners.push(Box::new(on_signal));
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now, before anything listens, so that a signal that
/// comes early (while a pool replays its journal at start, say, which as PID 1 in a container
/// the kernel would otherwise ignore) is counted, and the listeners that join later act on it
/// at once: a pool that starts listening after one SIGTERM drains at once.
///
/// Until a listener joins, no signal exits the process: the third exits once a pool listens,
/// the second when only [`shutdown_signal`] does. Calling it again does nothing.
///
/// # Errors
///
/// Registering the handlers failed (or, off Unix, signals are not supported).
pub fn catch_signals() -> io::Result<()> {
    owner().map(|_| ())
}

/// Resolves at the first SIGTERM or SIGINT, for services that own their main loop.
///
/// Made by [`shutdown_signal`]. Its output is `()`, so it can be handed straight to APIs that
/// take a shutdown future, such as `axum::serve(..).with_graceful_shutdown(..)`;
/// [`received`](Self::received) tells which signal came.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct ShutdownSignal {
    rx: oneshot::Receiver<Signal>,
}

impl ShutdownSignal {
    /// Waits for the signal, and says which it was.
    pub async fn received(self) -> Signal {
        match self.rx.await {
            Ok(signal) => signal,
            // The owner lives as long as the process, so its sender is never dropped; if it
            // were, no signal could ever come, which is what waiting forever means.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Future for ShutdownSignal {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(_)) => Poll::Ready(()),
            // As in `received`: a sender that is gone means no signal can come.
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Pending,
        }
    }
}

/// Listens for SIGTERM and SIGINT and returns a future that resolves at the first (at once if
/// one came before: see [`catch_signals`]).
///
/// It joins the process's one signal owner: with a pool's
/// [`run_until_signal`](crate::Pool::run_until_signal) in the same process, the signals are
/// counted once (the first resolves this future and starts the drain, the second skips the
/// drain's wait, the third exits the process with 128 + its number). Alone, the second exits
/// at once (130 for SIGINT, 143 for SIGTERM), from inside the signal handler, even if the
/// runtime is wedged. SIGQUIT keeps its default.
///
/// # Errors
///
/// Registering the handlers failed (or, off Unix, signals are not supported). Catching
/// SIGTERM is this crate's whole job, so this is an error, never a log line.
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// let signal = drainpool::shutdown_signal()?;
/// let received = signal.received().await;
/// tracing::info!(%received, "stopping");
/// # Ok(()) }
/// ```
pub fn shutdown_signal() -> io::Result<ShutdownSignal> {
    let (tx, rx) = oneshot::channel();
    let mut tx = Some(tx);
    listen(2, move |_, signal| {
        if let Some(tx) = tx.take() {
            let _ = tx.send(signal);
        }
    })?;
    Ok(ShutdownSignal { rx })
}

#[cfg(unix)]
mod imp {
    use std::io;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::iterator::Signals;

    use super::Signal;

    pub(super) fn number(signal: Signal) -> i32 {
        match signal {
            Signal::Terminate => SIGTERM,
            Signal::Interrupt => SIGINT,
        }
    }

    /// Set: the next signal exits the process from inside its handler.
    #[derive(Debug, Default)]
    pub(super) struct Armed(Arc<AtomicBool>);

    impl Armed {
        pub(super) fn set(&self, armed: bool) {
            self.0.store(armed, Ordering::SeqCst);
        }
    }

    /// Registers the handlers and starts the thread that hands each signal to `on_signal`.
    pub(super) fn install(armed: &Armed, on_signal: fn(Signal)) -> io::Result<()> {
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register_conditional_shutdown(
                signal,
                128 + signal,
                Arc::clone(&armed.0),
            )?;
        }
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        std::thread::Builder::new()
            .name("drainpool-signals".into())
            .spawn(move || {
                for raw in signals.forever() {
                    on_signal(if raw == SIGINT {
                        Signal::Interrupt
                    } else {
                        Signal::Terminate
                    });
                }
            })?;
        Ok(())
    }

    pub(super) fn exit(signal: Signal) -> ! {
        signal_hook::low_level::exit(128 + number(signal))
    }
}

#[cfg(not(unix))]
mod imp {
    use std::io;

    use super::Signal;

    pub(super) fn number(signal: Signal) -> i32 {
        match signal {
            Signal::Terminate => 15,
            Signal::Interrupt => 2,
        }
    }

    #[derive(Debug, Default)]
    pub(super) struct Armed;

    impl Armed {
        pub(super) fn set(&self, _armed: bool) {}
    }

    pub(super) fn install(_armed: &Armed, _on_signal: fn(Signal)) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "drainpool catches SIGTERM and SIGINT on Unix only; call Pool::shutdown instead",
        ))
    }

    pub(super) fn exit(signal: Signal) -> ! {
        std::process::exit(128 + number(signal))
    }
}
