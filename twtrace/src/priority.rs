//! twtrace's own CPU priority: by default below the services it traces, so that when both
//! want a CPU the service's threads run first and twtrace's reader waits its turn (the
//! ring buffers hold the events meanwhile).

use anyhow::{Context as _, bail};

/// The nice value twtrace runs at unless told otherwise (see `--nice`).
pub const DEFAULT_NICE: i32 = 10;

/// Sets the nice value of every thread of this process (Linux keeps one per thread, and
/// threads started later inherit their creator's).
pub fn set_nice(nice: i32) -> anyhow::Result<()> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .context("failed to list this process's threads in /proc/self/task (is /proc mounted?)")?;
    for task in tasks {
        let Some(tid) = task.ok().and_then(|t| t.file_name().to_str()?.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // SAFETY: a plain syscall naming a thread of this process.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                continue; // The thread ended meanwhile.
            }
            bail!(
                "failed to set twtrace's nice value to {nice}: {err} (a value below the current \
                 one needs CAP_SYS_NICE); run it as root, or pass a --nice of at least {}",
                current_nice().unwrap_or(0)
            );
        }
    }
    Ok(())
}

/// The calling thread's nice value.
pub fn current_nice() -> Option<i32> {
    // getpriority can legitimately return -1, so errors are told apart through errno.
    // SAFETY: errno is thread-local; the calls have no other preconditions.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        (*libc::__errno_location() == 0).then_some(nice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowering_the_priority_applies_to_every_thread() {
        // Raising the nice value needs no privilege; the test process only gets nicer.
        let before = current_nice().unwrap();
        let target = (before + 1).min(19);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            started_tx.send(()).unwrap();
            done_rx.recv().unwrap();
            current_nice()
        });
        started_rx.recv().unwrap();
        set_nice(target).unwrap();
        assert_eq!(current_nice(), Some(target));
        done_tx.send(()).unwrap();
        assert_eq!(other.join().unwrap(), Some(target), "a thread started earlier kept its nice");
    }
}
