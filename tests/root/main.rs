//! Root integration tests: the real twtrace binary, the real kernel, real sockets in
//! network namespaces the tests create (and delete). Run as root: `./x test`.
//!
//! The same executable also plays the client and server processes of a scenario (see
//! [`scenario`]): when `TWTRACE_TEST_ROLE` is set, `main` runs that role instead of the
//! tests, so every event has a known pid and comm to check against.

mod cli;
mod connect;
mod container;
mod pressure;
mod record;
mod scenario;
mod serve;
mod support;
mod trace;

use libtest_mimic::{Arguments, Trial};

fn main() -> std::process::ExitCode {
    if let Some(code) = scenario::run_role_if_requested() {
        return code;
    }
    let mut args = Arguments::from_args();
    // The tests share the kernel's tracepoints and the machine's two cores.
    args.test_threads.get_or_insert(1);
    let mut trials: Vec<Trial> = Vec::new();
    trials.extend(cli::trials());
    trials.extend(trace::trials());
    trials.extend(connect::trials());
    trials.extend(record::trials());
    trials.extend(pressure::trials());
    trials.extend(serve::trials());
    trials.extend(container::trials());
    libtest_mimic::run(&args, trials).exit_code()
}

/// Builds a trial from a test function that panics on failure.
fn trial(name: &str, test: fn()) -> Trial {
    Trial::test(name, move || {
        test();
        Ok(())
    })
}
