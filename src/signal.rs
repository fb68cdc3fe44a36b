//! Catching SIGTERM and SIGINT. All platform code for signals lives in this file.
//!
//! Nothing here is installed unless the user asks for it, through [`Pool::run_until_signal`]
//! or [`shutdown_signal`]. Signals are counted on a dedicated thread (signal-hook's iterator),
//! so escalation works even when the tokio runtime is wedged; the last step, the forced exit,
//! happens inside the signal handler itself (signal-hook's conditional shutdown).
//!
//! [`Pool::run_until_signal`]: crate::Pool::run_until_signal

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
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

/// Starts counting SIGTERM and SIGINT for the rest of the process's life.
///
/// `on_signal(count, signal)` runs on a dedicated thread for every signal, with `count`
/// counting both kinds together from 1. The signal numbered `exit_at` makes the process exit at
/// once with 128 + its number, from inside the signal handler.
pub(crate) fn listen(
    exit_at: u32,
    on_signal: impl FnMut(u32, Signal) + Send + 'static,
) -> io::Result<()> {
    imp::listen(exit_at, on_signal)
}

/// Resolves at the first SIGTERM or SIGINT, for services that own their main loop.
///
/// Made by [`shutdown_signal`]. It composes with APIs that take a shutdown future, such as
/// `axum::serve(..).with_graceful_shutdown(..)`.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct ShutdownSignal {
    rx: oneshot::Receiver<Signal>,
}

impl Future for ShutdownSignal {
    type Output = Signal;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Signal> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(signal)) => Poll::Ready(signal),
            // The listener thread never ends, so its sender is never dropped; if it were, no
            // signal could ever be reported, which is what pending means.
            Poll::Ready(Err(_)) => Poll::Pending,
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Installs handlers for SIGTERM and SIGINT and returns a future that resolves at the first.
///
/// From then on the process catches both for the rest of its life: the first resolves the
/// future, and the second exits the process at once with 128 + its number (130 for SIGINT,
/// 143 for SIGTERM), from inside the signal handler, even if the runtime is wedged. SIGQUIT
/// keeps its default. A pool's [`run_until_signal`](crate::Pool::run_until_signal) uses the
/// same machinery with one more step (the second signal skips the drain wait).
///
/// # Errors
///
/// Registering the handlers failed (or, off Unix, signals are not supported). Catching
/// SIGTERM is this crate's whole job, so this is an error, never a log line.
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// let signal = drainpool::shutdown_signal()?;
/// let received = signal.await;
/// tracing::info!(%received, "stopping");
/// # Ok(()) }
/// ```
pub fn shutdown_signal() -> io::Result<ShutdownSignal> {
    let (tx, rx) = oneshot::channel();
    let mut tx = Some(tx);
    listen(2, move |count, signal| {
        tracing::debug!(%signal, count, "signal received");
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

    pub(super) fn listen(
        exit_at: u32,
        mut on_signal: impl FnMut(u32, Signal) + Send + 'static,
    ) -> io::Result<()> {
        // Armed after signal `exit_at - 1`: the next one exits inside the handler.
        let armed = Arc::new(AtomicBool::new(exit_at <= 1));
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register_conditional_shutdown(
                signal,
                128 + signal,
                Arc::clone(&armed),
            )?;
        }
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        std::thread::Builder::new()
            .name("drainpool-signals".into())
            .spawn(move || {
                let mut count = 0u32;
                for raw in signals.forever() {
                    count = count.saturating_add(1);
                    let signal = if raw == SIGINT {
                        Signal::Interrupt
                    } else {
                        Signal::Terminate
                    };
                    if count >= exit_at {
                        // Two signals raced past the arming: exit here instead.
                        signal_hook::low_level::exit(128 + raw);
                    }
                    if count + 1 == exit_at {
                        armed.store(true, Ordering::SeqCst);
                    }
                    on_signal(count, signal);
                }
            })?;
        Ok(())
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

    pub(super) fn listen(
        _exit_at: u32,
        _on_signal: impl FnMut(u32, Signal) + Send + 'static,
    ) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "drainpool catches SIGTERM and SIGINT on Unix only; call Pool::shutdown instead",
        ))
    }
}
