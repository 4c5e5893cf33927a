//! What a user sees when something is wrong: exit codes and the wording of errors.

use std::process::{Command, Output};

use libtest_mimic::Trial;

use crate::{support::TWTRACE, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("cli::bad_state_is_a_usage_error", bad_state_is_a_usage_error),
        trial("cli::bad_ring_size_is_a_usage_error", bad_ring_size_is_a_usage_error),
        trial(
            "cli::unprivileged_user_is_told_which_capabilities",
            unprivileged_user_told_capabilities,
        ),
        trial("cli::missing_btf_is_explained", missing_btf_is_explained),
        trial("cli::help_lists_filters", help_lists_filters),
        trial("cli::completions_and_man_page_render", completions_and_man_page),
    ]
}

fn twtrace(args: &[&str]) -> Output {
    Command::new(TWTRACE).args(args).output().expect("failed to run twtrace")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn bad_state_is_a_usage_error() {
    let out = twtrace(&["trace", "--state", "WAITING"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown TCP state `WAITING`"), "{}", stderr(&out));
}

fn bad_ring_size_is_a_usage_error() {
    let out = twtrace(&["trace", "--ring-buffer-size", "3M"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("power of two"), "{}", stderr(&out));
}

fn unprivileged_user_told_capabilities() {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            TWTRACE,
            "trace",
        ])
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("CAP_BPF") && err.contains("CAP_PERFMON") && err.contains("sudo"),
        "{err}"
    );
}

fn missing_btf_is_explained() {
    let out = twtrace(&["trace", "--btf", "/nonexistent/vmlinux"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("CONFIG_DEBUG_INFO_BTF"), "{}", stderr(&out));
}

fn help_lists_filters() {
    let out = twtrace(&["trace", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--json", "--pid", "--comm", "--port", "--daddr", "--state", "--ipv4", "--ipv6"] {
        assert!(help.contains(flag), "help lacks {flag}:\n{help}");
    }
}

fn completions_and_man_page() {
    let bash = twtrace(&["completions", "bash"]);
    assert!(bash.status.success());
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(script.contains("_twtrace") && script.contains("--port-search-hooks"), "{script}");
    let man = twtrace(&["man"]);
    assert!(man.status.success());
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.contains(".TH twtrace 1") && page.contains("record"), "{page}");
    assert_eq!(twtrace(&["completions", "tcsh"]).status.code(), Some(2));
}
