//! twtrace's kernel side: one module per kernel hook, plus the tables they share.
#![no_std]
#![no_main]

mod connect;
mod error_report;
mod getsockopt;
mod kernel;
mod maps;
mod port_search;
mod sock_state;
mod staging;
mod tcp_reset;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; a loop keeps the
    // signature honest without unreachable_unchecked().
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
