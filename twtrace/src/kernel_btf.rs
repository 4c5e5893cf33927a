//! Offsets of the kernel structure fields the programs read, from the running kernel's BTF.
//!
//! Rust eBPF programs get no CO-RE relocations, so userspace resolves each field path here
//! and hands the offsets to the programs as read-only globals.

use std::path::Path;

use anyhow::{Context as _, bail};
use btf_rs::{Btf, Type};
use twtrace_common::config::KernelLayout;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Loads BTF from `path` (the kernel's by default).
pub fn load(path: Option<&Path>) -> anyhow::Result<Btf> {
    let path = path.unwrap_or(Path::new(VMLINUX_BTF));
    if !path.exists() {
        bail!(
            "this kernel exposes no BTF ({} is missing): twtrace needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y (the default on Debian 11+, Ubuntu 20.10+, RHEL 8.2+), \
             or a BTF file for it passed with --btf",
            path.display()
        );
    }
    Btf::from_file(path).with_context(|| format!("failed to parse BTF from {}", path.display()))
}

/// The offsets [`KernelLayout`] needs. The socket's namespace is required; the file
/// descriptor walk (for failed calls on sockets that never changed state) is optional.
pub fn kernel_layout(btf: &Btf) -> anyhow::Result<KernelLayout> {
    let mut layout = KernelLayout {
        sock_net: offset_of(btf, "sock", &["__sk_common", "skc_net"])?,
        net_ns_inum: offset_of(btf, "net", &["ns", "inum"])?,
        ..KernelLayout::default()
    };
    let walk = (|| -> anyhow::Result<[u32; 7]> {
        Ok([
            offset_of(btf, "task_struct", &["files"])?,
            offset_of(btf, "files_struct", &["fdt"])?,
            offset_of(btf, "fdtable", &["max_fds"])?,
            offset_of(btf, "fdtable", &["fd"])?,
            offset_of(btf, "file", &["private_data"])?,
            offset_of(btf, "socket", &["sk"])?,
            // A plain u16 since Linux 5.6; a bit field before (rejected by offset_of).
            offset_of(btf, "sock", &["sk_protocol"])?,
        ])
    })();
    match walk {
        Ok(
            [
                task_files,
                files_fdt,
                fdt_max_fds,
                fdt_fd,
                file_private_data,
                socket_sk,
                sock_protocol,
            ],
        ) => {
            layout.task_files = task_files;
            layout.files_fdt = files_fdt;
            layout.fdt_max_fds = fdt_max_fds;
            layout.fdt_fd = fdt_fd;
            layout.file_private_data = file_private_data;
            layout.socket_sk = socket_sk;
            layout.sock_protocol = sock_protocol;
            layout.fd_walk = 1;
        }
        Err(e) => log::warn!(
            "connect()/bind() failures that happen before the socket changes state \
             (e.g. ENETUNREACH) will not be reported: {e:#}"
        ),
    }
    let sock_addrs = (|| -> anyhow::Result<[u32; 7]> {
        let common = |field: &str| offset_of(btf, "sock", &["__sk_common", field]);
        Ok([
            common("skc_family")?,
            common("skc_daddr")?,
            common("skc_rcv_saddr")?,
            common("skc_dport")?,
            common("skc_num")?,
            common("skc_v6_daddr")?,
            common("skc_v6_rcv_saddr")?,
        ])
    })();
    match sock_addrs {
        Ok([family, daddr, rcv_saddr, dport, num, v6_daddr, v6_rcv_saddr]) => {
            layout.skc_family = family;
            layout.skc_daddr = daddr;
            layout.skc_rcv_saddr = rcv_saddr;
            layout.skc_dport = dport;
            layout.skc_num = num;
            layout.skc_v6_daddr = v6_daddr;
            layout.skc_v6_rcv_saddr = v6_rcv_saddr;
            layout.sock_addrs = 1;
        }
        Err(e) => log::warn!("the port-search hooks cannot read socket addresses: {e:#}"),
    }
    match offset_of(btf, "inet_sock", &["inet_sport"]) {
        Ok(off) => layout.inet_sport = off,
        Err(e) => log::debug!("the tp_btf state hook cannot be used: {e:#}"),
    }
    match offset_of(btf, "sock", &["sk_err"]) {
        Ok(off) => layout.sock_err = off,
        Err(e) => log::warn!("failed non-blocking connects will not be reported: {e:#}"),
    }
    match offset_of(btf, "sock", &["sk_err_soft"]) {
        Ok(off) => layout.sock_err_soft = off,
        Err(e) => log::warn!("some failed non-blocking connects will not be reported: {e:#}"),
    }
    match port_settings_layout(btf) {
        Ok((range, format, reuse, reuse_size)) => {
            layout.net_port_range = range;
            layout.port_range_format = format;
            layout.net_tw_reuse = reuse;
            layout.tw_reuse_size = reuse_size;
        }
        Err(e) => log::warn!("failures will not show the namespace's port range: {e:#}"),
    }
    Ok(layout)
}

/// Where `struct net` keeps `ip_local_port_range` and `tcp_tw_reuse`, and in which form.
fn port_settings_layout(btf: &Btf) -> anyhow::Result<(u32, u32, u32, u32)> {
    let range = offset_of(btf, "net", &["ipv4", "ip_local_ports", "range"])?;
    let format = match member_type(btf, "local_ports", "range")? {
        Type::Array(_) => 2,
        Type::Int(i) if i.size() == 4 => 1,
        other => bail!("unexpected type {} of local_ports.range", other.name()),
    };
    let reuse = offset_of(btf, "net", &["ipv4", "sysctl_tcp_tw_reuse"])?;
    let reuse_size = match member_type(btf, "netns_ipv4", "sysctl_tcp_tw_reuse")? {
        Type::Int(i) if i.size() == 1 || i.size() == 4 => i.size() as u32,
        other => bail!("unexpected type {} of sysctl_tcp_tw_reuse", other.name()),
    };
    Ok((range, format, reuse, reuse_size))
}

/// The type of member `member` of `struct name`, typedefs resolved.
fn member_type(btf: &Btf, name: &str, member: &str) -> anyhow::Result<Type> {
    let (_, ty) = find_member(btf, &struct_type(btf, name)?, member, 0)?
        .with_context(|| format!("struct {name} has no member `{member}`"))?;
    Ok(ty)
}

/// `struct name` in the BTF.
fn struct_type(btf: &Btf, name: &str) -> anyhow::Result<Type> {
    btf.resolve_types_by_name(name)
        .with_context(|| format!("BTF has no type `{name}`"))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .with_context(|| format!("BTF has no struct `{name}`"))
}

/// Byte offset of the member reached by `path` from `struct name`. Anonymous struct and
/// union members are searched through, as C's member access does.
pub fn offset_of(btf: &Btf, name: &str, path: &[&str]) -> anyhow::Result<u32> {
    let what = || format!("struct {name}.{}", path.join("."));
    let root = struct_type(btf, name)?;
    let mut ty = root;
    let mut bits = 0u32;
    for member_name in path {
        let (offset, next) = find_member(btf, &ty, member_name, 0)
            .with_context(what)?
            .with_context(|| format!("{} has no member `{member_name}`", what()))?;
        bits += offset;
        ty = next;
    }
    if !bits.is_multiple_of(8) {
        bail!("{} is a bit field", what());
    }
    Ok(bits / 8)
}

/// Finds `wanted` among the members of `ty` (descending into anonymous members), returning
/// its bit offset relative to `ty` and its type with typedefs and qualifiers removed.
fn find_member(
    btf: &Btf,
    ty: &Type,
    wanted: &str,
    depth: u8,
) -> anyhow::Result<Option<(u32, Type)>> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => bail!("not a struct or union"),
    };
    if depth > 8 {
        return Ok(None);
    }
    for member in members {
        let name = btf.resolve_name(member).unwrap_or_default();
        let member_ty = strip(btf, btf.resolve_chained_type(member)?)?;
        if name == wanted {
            return Ok(Some((member.bit_offset(), member_ty)));
        }
        if name.is_empty()
            && matches!(member_ty, Type::Struct(_) | Type::Union(_))
            && let Some((inner, found)) = find_member(btf, &member_ty, wanted, depth + 1)?
        {
            return Ok(Some((member.bit_offset() + inner, found)));
        }
    }
    Ok(None)
}

/// Follows typedefs and qualifiers to the underlying type.
fn strip(btf: &Btf, mut ty: Type) -> anyhow::Result<Type> {
    for _ in 0..16 {
        match &ty {
            Type::Typedef(t) => ty = btf.resolve_chained_type(t)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                ty = btf.resolve_chained_type(t)?
            }
            Type::TypeTag(t) => ty = btf.resolve_chained_type(t)?,
            _ => return Ok(ty),
        }
    }
    bail!("type chain too long")
}
