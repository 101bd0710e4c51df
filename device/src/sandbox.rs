//! The sandbox vsnd-device puts itself in before it reads a guest byte and
//! before it starts a thread.
//!
//! In order: every descriptor but the standard streams (/dev/null and the
//! log pipe), the vhost-user listener and the broker channel is closed;
//! `PR_SET_NO_NEW_PRIVS`; a parent-death signal, and a check that the
//! parent is still the broker; every capability
//! dropped (effective, permitted, inheritable, ambient, bounding); rlimits
//! (few descriptors, no file writes, no core dumps); landlock with every
//! filesystem and network right of the best ABI the kernel has, no allowed
//! path, and the abstract-socket and signal scopes; then the seccomp profile
//! from `policy/seccomp/<arch>/device.json`, embedded at build time, for all
//! threads. After the threads exist, `RLIMIT_NPROC` goes to 0.
//!
//! Landlock before ABI 9 cannot stop `connect()` to a pathname Unix socket,
//! so the seccomp profile has no `socket`, `connect` or `bind` at all.

use std::io;
use std::os::fd::RawFd;

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, Ruleset, RulesetAttr,
    RulesetStatus, Scope, ABI,
};

/// The reviewed seccomp profile for this architecture.
#[cfg(target_arch = "x86_64")]
pub const PROFILE: &str = include_str!("../../policy/seccomp/x86_64/device.json");
/// The reviewed seccomp profile for this architecture.
#[cfg(target_arch = "aarch64")]
pub const PROFILE: &str = include_str!("../../policy/seccomp/aarch64/device.json");

/// Path of the profile in the repository, for messages.
#[cfg(target_arch = "x86_64")]
pub const PROFILE_PATH: &str = "policy/seccomp/x86_64/device.json";
/// Path of the profile in the repository, for messages.
#[cfg(target_arch = "aarch64")]
pub const PROFILE_PATH: &str = "policy/seccomp/aarch64/device.json";

/// The filter in the profile that lists what the device may do.
pub const MAIN_FILTER: &str = "device";
/// The filter that makes `clone3` fail with ENOSYS, so the C library falls
/// back to `clone`, whose flags the main filter can check.
pub const CLONE3_FILTER: &str = "clone3_enosys";

/// Most descriptors the device may hold.
pub const MAX_FDS: u64 = 64;

/// What to do with a system call outside the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the device (after naming the call on stderr).
    Kill,
    /// Allow it and let the kernel log it (for diagnosing a profile).
    Log,
}

/// What was enforced, for the log.
#[derive(Debug, Clone)]
pub struct Report {
    /// Landlock as the kernel reported it.
    pub landlock: String,
    /// Capabilities left in the bounding set (0 unless the device lacked
    /// CAP_SETPCAP to drop them, i.e. it was not started by a root broker).
    pub bounding_left: u32,
}

/// Why sandboxing failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{what}: {err}")]
    Sys { what: &'static str, err: io::Error },
    #[error("the device runs as root (uid 0): start vsnd-broker with --device-user, or as a normal user")]
    Root,
    #[error("the parent process is {actual}, not the broker ({expected}): the broker is gone")]
    Orphan { expected: i32, actual: i32 },
    #[error(
        "landlock is not available on this kernel ({0}); the device refuses to run unsandboxed"
    )]
    NoLandlock(String),
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("seccomp profile {PROFILE_PATH}: {0}")]
    Profile(String),
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> SandboxError {
    move |err| SandboxError::Sys { what, err }
}

fn check(what: &'static str, rc: libc::c_int) -> Result<(), SandboxError> {
    if rc < 0 {
        Err(SandboxError::Sys {
            what,
            err: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// Everything up to (not including) seccomp. Call from the main thread
/// before any other thread exists. `keep` are the descriptors to keep
/// besides stderr.
pub fn restrict(keep: &[RawFd], expected_parent: Option<i32>) -> Result<Report, SandboxError> {
    // glibc installs an internal signal handler (for SIGSETXID) the first
    // time a thread is created. Create and join one thread now, so that the
    // profile never has to allow rt_sigaction. It is gone before anything
    // below runs; every thread that later touches guest bytes is created
    // inside the sandbox.
    std::thread::Builder::new()
        .name("vsnd-init".into())
        .spawn(|| ())
        .map_err(sys("starting the C library's thread support"))?
        .join()
        .map_err(|_| SandboxError::Sys {
            what: "thread join",
            err: io::Error::other("panicked"),
        })?;
    close_other_fds(keep)?;
    // SAFETY: prctl with integer arguments only.
    check("PR_SET_NO_NEW_PRIVS", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    // SAFETY: as above.
    check("PR_SET_PDEATHSIG", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
    })?;
    // The broker may have died before the death signal was armed.
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() };
    if let Some(expected) = expected_parent {
        if parent != expected {
            return Err(SandboxError::Orphan {
                expected,
                actual: parent,
            });
        }
    }
    // SAFETY: getuid/geteuid cannot fail.
    if unsafe { libc::getuid() } == 0 || unsafe { libc::geteuid() } == 0 {
        return Err(SandboxError::Root);
    }
    let bounding_left = drop_capabilities()?;
    set_limit(libc::RLIMIT_NOFILE, MAX_FDS, "RLIMIT_NOFILE")?;
    set_limit(libc::RLIMIT_FSIZE, 0, "RLIMIT_FSIZE")?;
    set_limit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    let landlock = landlock()?;
    Ok(Report {
        landlock,
        bounding_left,
    })
}

/// Close every descriptor except the standard streams and `keep`. The
/// broker opens stdin and stdout on /dev/null and stderr on the log pipe;
/// they stay open so that no descriptor opened later (an eventfd, guest
/// memory) can land on a standard stream number and be written by mistake.
fn close_other_fds(keep: &[RawFd]) -> Result<(), SandboxError> {
    let mut keep: Vec<u32> = keep.iter().filter_map(|&f| u32::try_from(f).ok()).collect();
    keep.extend([0, 1, 2]);
    keep.sort_unstable();
    keep.dedup();
    let mut from = 0u32;
    for k in keep.iter().copied().chain(std::iter::once(u32::MAX)) {
        if k > from {
            let to = if k == u32::MAX { u32::MAX } else { k - 1 };
            // SAFETY: close_range on integer bounds; closes only descriptors
            // this process owns and nothing in it still uses.
            let rc = unsafe { libc::syscall(libc::SYS_close_range, from, to, 0u32) };
            if rc < 0 {
                return Err(SandboxError::Sys {
                    what: "close_range",
                    err: io::Error::last_os_error(),
                });
            }
        }
        from = k.saturating_add(1);
    }
    Ok(())
}

/// Drop every capability; returns how many bounding-set entries could not
/// be dropped (without CAP_SETPCAP they stay, harmless under no_new_privs
/// with empty permitted and inheritable sets).
fn drop_capabilities() -> Result<u32, SandboxError> {
    let mut left = 0;
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if present < 0 {
            break; // past the kernel's last capability
        }
        if present == 1 {
            // SAFETY: as above.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
                left += 1;
            }
        }
    }
    // SAFETY: as above.
    check("PR_CAP_AMBIENT_CLEAR_ALL", unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    for set in [
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| SandboxError::Sys {
            what: "clearing capabilities",
            err: io::Error::other(e.to_string()),
        })?;
    }
    Ok(left)
}

fn set_limit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    what: &'static str,
) -> Result<(), SandboxError> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    check(what, unsafe { libc::setrlimit(resource, &lim) })
}

/// After the last thread is started: no more processes or threads.
pub fn forbid_new_tasks() -> Result<(), SandboxError> {
    set_limit(libc::RLIMIT_NPROC, 0, "RLIMIT_NPROC")
}

fn landlock() -> Result<String, SandboxError> {
    let abi = ABI::V10;
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    let kernel = match status.landlock {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => match kernel_abi {
            Some(k) => format!("ABI {k} (used as {effective_abi:?})"),
            None => format!("ABI {}", effective_abi as i32),
        },
        LandlockStatus::NotEnabled => {
            return Err(SandboxError::NoLandlock("not enabled at boot".into()))
        }
        LandlockStatus::NotImplemented => {
            return Err(SandboxError::NoLandlock("not built in".into()))
        }
    };
    let enforced = match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "enforced with every right this kernel knows",
        RulesetStatus::NotEnforced => return Err(SandboxError::NoLandlock(kernel)),
    };
    Ok(format!("landlock {kernel}, {enforced}, no path allowed"))
}

/// Compile the embedded profile: the main filter (in `mode`) and the clone3
/// filter.
pub fn compile(mode: SeccompMode) -> Result<Vec<seccompiler::BpfProgram>, SandboxError> {
    compile_profile(PROFILE, mode, std::env::consts::ARCH)
}

/// Compile a profile for `arch` (`x86_64` or `aarch64`).
pub fn compile_profile(
    json: &str,
    mode: SeccompMode,
    arch: &str,
) -> Result<Vec<seccompiler::BpfProgram>, SandboxError> {
    let mut doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| SandboxError::Profile(e.to_string()))?;
    if mode == SeccompMode::Log {
        let main = doc
            .get_mut(MAIN_FILTER)
            .and_then(|f| f.get_mut("mismatch_action"))
            .ok_or_else(|| SandboxError::Profile(format!("no {MAIN_FILTER}.mismatch_action")))?;
        *main = serde_json::Value::String("log".into());
    }
    let arch = seccompiler::TargetArch::try_from(arch)
        .map_err(|e| SandboxError::Profile(format!("{e:?}")))?;
    let text = doc.to_string();
    let mut map = seccompiler::compile_from_json(text.as_bytes(), arch)
        .map_err(|e| SandboxError::Profile(e.to_string()))?;
    let mut out = Vec::new();
    for name in [MAIN_FILTER, CLONE3_FILTER] {
        out.push(
            map.remove(name)
                .ok_or_else(|| SandboxError::Profile(format!("no filter {name:?}")))?,
        );
    }
    if let Some(extra) = map.keys().next() {
        return Err(SandboxError::Profile(format!(
            "unexpected filter {extra:?}"
        )));
    }
    Ok(out)
}

/// Install the seccomp filters on every thread of the process.
pub fn apply_seccomp(mode: SeccompMode) -> Result<(), SandboxError> {
    install_sigsys_reporter().map_err(sys("SIGSYS handler"))?;
    // The clone3 filter first: installing a filter makes a prctl and a
    // seccomp call, which the main filter (once in place) does not allow.
    for prog in compile(mode)?.iter().rev() {
        seccompiler::apply_filter_all_threads(prog)
            .map_err(|e| SandboxError::Profile(e.to_string()))?;
    }
    Ok(())
}

/// On a blocked call the kernel raises SIGSYS in the offending thread. The
/// handler names the call on stderr, then makes the same call again: SIGSYS
/// is blocked inside the handler, so the kernel resets it to its default
/// action and the process dies of SIGSYS. The call itself never runs.
fn install_sigsys_reporter() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is an
    // extern "C" fn of the SA_SIGINFO signature that only makes
    // async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // siginfo's SIGSYS fields: call address (8 bytes at offset 16), then the
    // system call number (int at offset 24) on 64-bit Linux.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers;
        // offset 24 lies within it.
        unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) }
    };
    let mut buf = [0u8; 256];
    let mut len = 0;
    for part in [
        &b"vsnd-device: seccomp: blocked system call "[..],
        itoa(nr, &mut [0u8; 12]),
        b" (",
        syscall_name(i64::from(nr)).as_bytes(),
        b"), not in ",
        PROFILE_PATH.as_bytes(),
        b"; the device is killed\n",
    ] {
        for &b in part {
            if let Some(slot) = buf.get_mut(len) {
                *slot = b;
                len += 1;
            }
        }
    }
    // SAFETY: write and syscall are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::c_long::from(nr));
        // Not reached unless the call was allowed after all.
        libc::_exit(128 + libc::SIGSYS);
    }
}

fn itoa(n: i32, buf: &mut [u8; 12]) -> &[u8] {
    let neg = n < 0;
    let mut v = i64::from(n).unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 1 {
            break;
        }
    }
    if neg {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

macro_rules! names {
    ($nr:expr; $($name:ident),* $(,)?) => {
        match $nr {
            $(n if n == libc::$name => &stringify!($name)[4..],)*
            _ => "unknown; see policy/README.md",
        }
    };
}

/// The name of a system call number, for the common ones a compromised or
/// buggy device might try.
pub fn syscall_name(nr: i64) -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if nr == libc::SYS_open {
            return "open";
        }
        if nr == libc::SYS_fork {
            return "fork";
        }
        if nr == libc::SYS_vfork {
            return "vfork";
        }
        if nr == libc::SYS_stat {
            return "stat";
        }
        if nr == libc::SYS_epoll_wait {
            return "epoll_wait";
        }
    }
    names!(nr;
        SYS_openat, SYS_openat2, SYS_socket, SYS_socketpair, SYS_connect, SYS_bind, SYS_listen,
        SYS_accept, SYS_execve, SYS_execveat, SYS_ptrace, SYS_kill, SYS_tkill, SYS_tgkill,
        SYS_rt_sigqueueinfo, SYS_rt_tgsigqueueinfo, SYS_pidfd_open, SYS_pidfd_send_signal,
        SYS_process_vm_readv, SYS_process_vm_writev, SYS_clone, SYS_clone3, SYS_unshare,
        SYS_setns, SYS_mount, SYS_chdir, SYS_mkdirat, SYS_unlinkat, SYS_renameat2,
        SYS_newfstatat, SYS_statx, SYS_getdents64, SYS_ioctl, SYS_mmap, SYS_mprotect,
        SYS_memfd_create, SYS_userfaultfd, SYS_bpf, SYS_perf_event_open, SYS_keyctl,
        SYS_add_key, SYS_io_uring_setup, SYS_rt_sigaction, SYS_prctl, SYS_prlimit64,
        SYS_setuid, SYS_setgid, SYS_capset, SYS_fcntl, SYS_dup3, SYS_pipe2, SYS_read,
        SYS_write, SYS_readv, SYS_writev, SYS_pread64, SYS_pwrite64, SYS_madvise,
        SYS_getrandom, SYS_sched_setaffinity, SYS_sched_getaffinity, SYS_uname, SYS_sysinfo,
        SYS_times, SYS_getrusage, SYS_wait4, SYS_waitid, SYS_exit, SYS_exit_group,
        SYS_nanosleep, SYS_clock_nanosleep, SYS_signalfd4,
        SYS_inotify_init1, SYS_fanotify_init, SYS_mremap, SYS_msync, SYS_mlock, SYS_shmget,
        SYS_shmat, SYS_semget, SYS_msgget, SYS_set_mempolicy, SYS_mbind, SYS_move_pages,
        SYS_kcmp, SYS_getsockopt, SYS_setsockopt, SYS_getsockname, SYS_getpeername,
        SYS_sendmmsg, SYS_recvmmsg, SYS_splice, SYS_tee, SYS_vmsplice, SYS_sendfile,
        SYS_copy_file_range, SYS_fallocate, SYS_ftruncate, SYS_flock, SYS_fsync,
        SYS_fchmod, SYS_fchown, SYS_linkat, SYS_symlinkat, SYS_readlinkat, SYS_faccessat,
        SYS_faccessat2, SYS_landlock_create_ruleset, SYS_landlock_add_rule,
        SYS_landlock_restrict_self, SYS_seccomp, SYS_sched_setscheduler, SYS_setpriority,
        SYS_ioprio_set, SYS_personality, SYS_syslog, SYS_reboot, SYS_init_module,
        SYS_finit_module, SYS_kexec_load, SYS_acct, SYS_quotactl, SYS_swapon, SYS_chroot,
        SYS_pivot_root, SYS_umount2, SYS_fsopen, SYS_open_tree, SYS_move_mount,
        // The calls the profile allows, so that a profile missing one of
        // them names it too.
        SYS_accept4, SYS_recvfrom, SYS_sendto, SYS_recvmsg, SYS_sendmsg, SYS_shutdown,
        SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait, SYS_eventfd2, SYS_close,
        SYS_munmap, SYS_brk, SYS_futex, SYS_sched_yield, SYS_set_robust_list, SYS_rseq,
        SYS_rt_sigprocmask, SYS_sigaltstack, SYS_rt_sigreturn, SYS_gettid, SYS_getpid,
        SYS_clock_gettime, SYS_timerfd_create, SYS_timerfd_settime,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itoa_formats() {
        assert_eq!(itoa(0, &mut [0; 12]), b"0");
        assert_eq!(itoa(41, &mut [0; 12]), b"41");
        assert_eq!(itoa(-1, &mut [0; 12]), b"-1");
        assert_eq!(itoa(i32::MIN, &mut [0; 12]), b"-2147483648");
    }

    #[test]
    fn names_of_common_calls() {
        assert_eq!(syscall_name(libc::SYS_accept4), "accept4");
        assert_eq!(syscall_name(libc::SYS_socket), "socket");
        assert_eq!(syscall_name(libc::SYS_openat), "openat");
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert!(syscall_name(100_000).starts_with("unknown"));
    }

    /// The auditors' README names every allowed call, so it cannot drift
    /// from the profiles silently.
    #[test]
    fn policy_readme_names_every_allowed_call() {
        let readme = include_str!("../../policy/README.md");
        for json in [
            include_str!("../../policy/seccomp/x86_64/device.json"),
            include_str!("../../policy/seccomp/aarch64/device.json"),
        ] {
            let doc: serde_json::Value = serde_json::from_str(json).unwrap();
            for rule in doc[MAIN_FILTER]["filter"].as_array().unwrap() {
                let name = rule["syscall"].as_str().unwrap();
                assert!(
                    readme.contains(&format!("`{name}`")),
                    "policy/README.md does not mention `{name}`"
                );
            }
        }
    }

    /// Every profile in policy/ compiles for its architecture, in both modes.
    #[test]
    fn every_profile_compiles() {
        for (arch, json) in [
            (
                "x86_64",
                include_str!("../../policy/seccomp/x86_64/device.json"),
            ),
            (
                "aarch64",
                include_str!("../../policy/seccomp/aarch64/device.json"),
            ),
        ] {
            for mode in [SeccompMode::Kill, SeccompMode::Log] {
                let progs = compile_profile(json, mode, arch)
                    .unwrap_or_else(|e| panic!("{arch} profile ({mode:?}): {e}"));
                assert_eq!(progs.len(), 2);
                assert!(progs.iter().all(|p| !p.is_empty()));
            }
        }
    }

    /// The profile never allows what the sandbox promises to forbid, and
    /// every rule carries a reason.
    #[test]
    fn profiles_forbid_the_dangerous_calls_and_explain_the_rest() {
        const FORBIDDEN: &[&str] = &[
            "socket",
            "socketpair",
            "connect",
            "bind",
            "listen",
            "execve",
            "execveat",
            "ptrace",
            "open",
            "openat",
            "openat2",
            "creat",
            "kill",
            "tkill",
            "tgkill",
            "rt_sigqueueinfo",
            "rt_tgsigqueueinfo",
            "pidfd_send_signal",
            "process_vm_readv",
            "process_vm_writev",
            "fork",
            "vfork",
            "unshare",
            "setns",
            "mount",
            "memfd_create",
            "userfaultfd",
            "bpf",
            "io_uring_setup",
            "rt_sigaction",
        ];
        for json in [
            include_str!("../../policy/seccomp/x86_64/device.json"),
            include_str!("../../policy/seccomp/aarch64/device.json"),
        ] {
            let doc: serde_json::Value = serde_json::from_str(json).unwrap();
            let main = &doc[MAIN_FILTER];
            assert_eq!(
                main["mismatch_action"], "trap",
                "blocked calls must not run"
            );
            for rule in main["filter"].as_array().unwrap() {
                let name = rule["syscall"].as_str().unwrap();
                assert!(!FORBIDDEN.contains(&name), "{name} must not be allowed");
                let reason = rule["comment"].as_str().unwrap_or("");
                assert!(reason.len() > 10, "{name} needs a one-line reason");
                if name == "mmap" || name == "mprotect" {
                    let args = rule["args"]
                        .as_array()
                        .expect("mmap/mprotect need an argument check");
                    assert!(
                        args.iter()
                            .any(|a| a["index"] == 2 && a["op"]["masked_eq"] == 4 && a["val"] == 0),
                        "{name} must require PROT_EXEC to be clear"
                    );
                }
            }
        }
    }
}
