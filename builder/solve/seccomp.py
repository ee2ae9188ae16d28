"""The seccomp profile RUN steps get, as data: lbuild's own, equal in effect to Docker's default.

Written for lbuild (not copied from moby): an allowlist.  A system call that is not listed
fails with EPERM, as in Docker, so a system call added to the kernel later is denied until
it is listed here.  ``tests/test_seccomp_moby.py`` compares it, call by call, with moby's
default profile as it applies on x86_64 with Docker's default capabilities (a list of names
in ``fixtures/seccomp/``); the differences are ``NOT_DOCKERS_ON_X86_64``.  What it allows,
by purpose:

- files, directories, xattrs (the ``*xattrat`` calls too), pipes, polling, inotify, AIO
  (``io_setup`` ...), memfd (``memfd_secret`` too), ``name_to_handle_at`` (a handle is
  harmless without ``open_by_handle_at``), ``cachestat``, ``statmount``/``listmount``;
- memory (``mmap``, ``mprotect``, ``mlock``, ``pkey_*``, ``membarrier`` ...);
- processes and threads: ``fork``/``vfork``, ``clone`` *without* any namespace flag,
  ``execve``, signals (the ``rt_*`` calls; not i386's old ``signal``/``sigaction``...),
  ids (``setuid`` ...), capabilities (``capget``/``capset``), scheduling, resource limits,
  ``prctl``, ``seccomp`` (a process may confine itself further), ``ptrace`` and
  ``process_vm_*`` (as Docker does on kernels from 4.8), ``pidfd_open``/``pidfd_send_signal``,
  ``process_mrelease``, landlock, ``arch_prctl`` and ``modify_ldt`` (x86, as Docker);
- System V and POSIX IPC; time (reading clocks, timers, sleeping; ``adjtimex`` and
  ``clock_adjtime``, which set a clock only with ``CAP_SYS_TIME``, not in RUN's set);
  sockets of every family but ``AF_ALG`` and ``AF_VSOCK``; ``chroot`` (``CAP_SYS_CHROOT``
  is in the default capability set); ``personality`` only for the values Docker allows
  (Linux, UNAME26, their query).

What it denies (EPERM): mounting and namespaces (``mount``, ``umount2``, the new mount API
``fsopen``/``fsmount``/``move_mount``/``open_tree``..., ``pivot_root``, ``unshare``, ``setns``,
``clone`` with a ``CLONE_NEW*`` flag); kernel modules and kexec; ``bpf``, ``perf_event_open``,
``userfaultfd``, ``io_uring_*``; the kernel keyring (``add_key``, ``keyctl``,
``request_key``); setting clocks (``settimeofday``, ``clock_settime``); ``reboot``,
``swapon``/``swapoff``, ``acct``, ``quotactl``, ``syslog``, ``vhangup``,
``sethostname``/``setdomainname``; ``open_by_handle_at`` (the "shocker" escape); NUMA
placement (``mbind``, ``set_mempolicy``, ``move_pages``, ``migrate_pages``: Docker ties them
to ``CAP_SYS_NICE``, which RUN lacks); ``kcmp``, ``pidfd_getfd``, ``process_madvise``
(``CAP_SYS_PTRACE`` in Docker), ``iopl``/``ioperm``, ``lookup_dcookie`` and obsolete calls
(``uselib``, ``ustat``, ``sysfs``, ``_sysctl``, ``nfsservctl``, ``vm86``...).  ``clone3``
fails with ENOSYS so that C libraries fall back to ``clone``, whose flags a filter can check.

Both RUN paths use these lists: :func:`oci_profile` for runc's config.json, and
:func:`load` (libseccomp through ctypes) for the built-in executor.
"""

from __future__ import annotations

import ctypes
import errno
import platform
from typing import Any

__all__ = ["ALLOWED", "Filter", "load", "oci_profile"]

# One string split into words: the list reads by purpose, a line per group.
ALLOWED: tuple[str, ...] = tuple(
    """
    read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2
    open openat openat2 creat close close_range lseek _llseek dup dup2 dup3 fcntl fcntl64
    ioctl flock fsync fdatasync sync syncfs sync_file_range sync_file_range2
    arm_sync_file_range truncate truncate64 ftruncate ftruncate64 fallocate fadvise64
    fadvise64_64 arm_fadvise64_64 readahead sendfile sendfile64 splice tee vmsplice
    copy_file_range pipe pipe2 stat stat64 fstat fstat64 lstat lstat64 newfstatat fstatat64
    statx statfs statfs64 fstatfs fstatfs64 access faccessat faccessat2 readlink readlinkat
    getdents getdents64 getcwd chdir fchdir mkdir mkdirat rmdir rename renameat renameat2
    link linkat symlink symlinkat unlink unlinkat chmod fchmod fchmodat fchmodat2 chown
    chown32 fchown fchown32 fchownat lchown lchown32 umask utime utimes utimensat
    utimensat_time64 futimesat mknod mknodat chroot
    setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr llistxattr
    flistxattr removexattr lremovexattr fremovexattr setxattrat getxattrat listxattrat
    removexattrat name_to_handle_at cachestat statmount listmount
    inotify_init inotify_init1 inotify_add_watch inotify_rm_watch fanotify_mark memfd_create
    memfd_secret
    io_setup io_destroy io_getevents io_pgetevents io_pgetevents_time64 io_submit io_cancel
    eventfd eventfd2 signalfd signalfd4 timerfd_create timerfd_settime timerfd_gettime
    timerfd_settime64 timerfd_gettime64 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
    epoll_wait epoll_wait_old epoll_pwait epoll_pwait2 poll ppoll ppoll_time64 select
    _newselect pselect6 pselect6_time64
    brk mmap mmap2 munmap mremap mprotect pkey_mprotect pkey_alloc pkey_free madvise mlock
    mlock2 munlock mlockall munlockall mincore msync remap_file_pages membarrier mseal
    map_shadow_stack
    fork vfork execve execveat exit exit_group wait4 waitid waitpid kill tkill tgkill
    rt_sigaction rt_sigprocmask rt_sigreturn sigreturn rt_sigpending rt_sigsuspend
    rt_sigtimedwait rt_sigtimedwait_time64 rt_sigqueueinfo rt_tgsigqueueinfo sigaltstack
    sigprocmask pause alarm restart_syscall
    getpid getppid gettid getpgid setpgid getpgrp getsid setsid
    getuid getuid32 geteuid geteuid32 getgid getgid32 getegid getegid32 setuid setuid32
    setgid setgid32 setreuid setreuid32 setregid setregid32 setresuid setresuid32 setresgid
    setresgid32 getresuid getresuid32 getresgid getresgid32 setfsuid setfsuid32 setfsgid
    setfsgid32 getgroups getgroups32 setgroups setgroups32 capget capset
    prctl arch_prctl set_tid_address set_robust_list get_robust_list futex futex_time64
    futex_waitv futex_wake futex_wait futex_requeue rseq get_thread_area set_thread_area
    set_tls cacheflush breakpoint modify_ldt uretprobe riscv_hwprobe
    sched_yield sched_getaffinity sched_setaffinity sched_getparam sched_setparam
    sched_getscheduler sched_setscheduler sched_get_priority_max sched_get_priority_min
    sched_rr_get_interval sched_rr_get_interval_time64 sched_getattr sched_setattr
    getpriority setpriority ioprio_get ioprio_set getrlimit setrlimit prlimit64 ugetrlimit
    getrusage times uname sysinfo getcpu getrandom seccomp
    ptrace process_vm_readv process_vm_writev pidfd_open pidfd_send_signal process_mrelease
    landlock_create_ruleset landlock_add_rule landlock_restrict_self
    mq_open mq_unlink mq_timedsend mq_timedsend_time64 mq_timedreceive
    mq_timedreceive_time64 mq_notify mq_getsetattr shmget shmat shmdt shmctl semget semop
    semctl semtimedop semtimedop_time64 msgget msgsnd msgrcv msgctl ipc
    time gettimeofday clock_gettime clock_gettime64 clock_getres clock_getres_time64
    clock_nanosleep clock_nanosleep_time64 nanosleep timer_create timer_settime
    timer_gettime timer_getoverrun timer_delete timer_settime64 timer_gettime64 getitimer
    setitimer adjtimex clock_adjtime clock_adjtime64
    socketpair bind listen accept accept4 connect getsockname getpeername sendto recvfrom
    send recv sendmsg recvmsg sendmmsg recvmmsg recvmmsg_time64 shutdown setsockopt
    getsockopt socketcall
    """.split()  # noqa: SIM905
)
"""Allowed with any arguments."""

NOT_DOCKERS_ON_X86_64: dict[str, str] = {
    name: "ARM only (Docker allows it there): no such call on x86_64, x86 or x32"
    for name in ("arm_fadvise64_64", "arm_sync_file_range", "breakpoint", "cacheflush", "set_tls")
} | {
    "sync_file_range2": "ARM and ppc64le only (Docker allows it there): no such call on x86",
}
"""What ``ALLOWED`` holds that Docker's default profile does not allow on x86_64, and why
(``tests/test_seccomp_moby.py`` checks the list against moby's, docs/hardening.md shows it)."""

CLONE_NAMESPACE_FLAGS = 0x7E020000
"""CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET: ``clone`` passes only without them."""
AF_ALG = 38
AF_VSOCK = 40
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
"""PER_LINUX, PER_LINUX32, UNAME26 (and with PER_LINUX32), and the query value."""

# (name, ((arg index, op, value), ...)): one rule each, all its conditions must hold; several
# rules for one name are alternatives.  MASKED_EQ's value is the mask, and the masked
# argument must be 0.
_Cond = tuple[tuple[int, str, int], ...]
_CONDITIONAL: tuple[tuple[str, _Cond], ...] = (
    ("clone", ((0, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS),)),
    # every address family but AF_ALG (the kernel's crypto API) and AF_VSOCK, as Docker
    ("socket", ((0, "SCMP_CMP_LT", AF_ALG),)),
    ("socket", ((0, "SCMP_CMP_EQ", AF_ALG + 1),)),
    ("socket", ((0, "SCMP_CMP_GT", AF_VSOCK),)),
    *(("personality", ((0, "SCMP_CMP_EQ", v),)) for v in PERSONALITY_ALLOWED),
)
_ENOSYS = ("clone3",)

_ARCHES = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
    "ppc64le": ("SCMP_ARCH_PPC64LE",),
    "s390x": ("SCMP_ARCH_S390X", "SCMP_ARCH_S390"),
    "riscv64": ("SCMP_ARCH_RISCV64",),
}


def oci_profile() -> dict[str, Any]:
    """The profile as an OCI runtime-spec ``linux.seccomp`` object (what runc takes)."""
    syscalls: list[dict[str, Any]] = [
        {"names": list(ALLOWED), "action": "SCMP_ACT_ALLOW"},
    ]
    for name, args in _CONDITIONAL:
        # The OCI spec puts a MASKED_EQ's mask in "value" and the expected value in "valueTwo".
        syscalls.append(
            {
                "names": [name],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {"index": i, "value": v, "valueTwo": 0, "op": op}
                    if op == "SCMP_CMP_MASKED_EQ"
                    else {"index": i, "value": v, "op": op}
                    for i, op, v in args
                ],
            }
        )
    syscalls.append({"names": list(_ENOSYS), "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.EPERM,
        "architectures": list(_ARCHES.get(platform.machine(), ())),
        "syscalls": syscalls,
    }


# ---------------------------------------------------------------------------------------
# the built-in executor: libseccomp through ctypes
# ---------------------------------------------------------------------------------------
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_FLTATR_CTL_NNP = 3
_CMP_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_EQ": 4, "SCMP_CMP_GT": 6,
            "SCMP_CMP_MASKED_EQ": 7}


def _act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class Filter:
    """A compiled filter, built before pivot_root (libseccomp must still be reachable) and
    loaded just before exec with :meth:`load`."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError as exc:
            raise OSError(
                0, "seccomp: libseccomp.so.2 is not installed (install libseccomp2 or runc)"
            ) from exc
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self._lib = lib
        ctx = lib.seccomp_init(_act_errno(errno.EPERM))
        if not ctx:
            raise OSError(0, "seccomp: seccomp_init failed")
        self._ctx = ctx
        # Docker does not set no_new_privs: setuid binaries (su, sudo) keep working in RUN.
        self._ok(lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_NNP, 0), "attr_set")
        native = _ARCHES.get(platform.machine(), ())
        for arch in native[1:]:
            token = lib.seccomp_arch_resolve_name(arch.removeprefix("SCMP_ARCH_").lower().encode())
            if token:
                rc = lib.seccomp_arch_add(ctx, token)
                if rc not in (0, -errno.EEXIST):
                    self._ok(rc, f"arch_add {arch}")
        for name in ALLOWED:
            self._rule(_SCMP_ACT_ALLOW, name, ())
        for name, args in _CONDITIONAL:
            self._rule(_SCMP_ACT_ALLOW, name, args)
        for name in _ENOSYS:
            self._rule(_act_errno(errno.ENOSYS), name, ())

    @staticmethod
    def _ok(rc: int, what: str) -> None:
        if rc < 0:
            raise OSError(-rc, f"seccomp: {what}: {errno.errorcode.get(-rc, str(-rc))}")

    def _rule(self, action: int, name: str, args: _Cond) -> None:
        nr = self._lib.seccomp_syscall_resolve_name(name.encode())
        if nr == -1:  # __NR_SCMP_ERROR: no such system call on any architecture libseccomp knows
            return
        arr = (_ArgCmp * max(1, len(args)))()
        for j, (i, op, v) in enumerate(args):
            arr[j] = _ArgCmp(i, _CMP_OPS[op], v, 0)  # MASKED_EQ: datum_a mask, datum_b expected
        rc = self._lib.seccomp_rule_add_array(self._ctx, action, nr, len(args), arr)
        # EDOM/EFAULT: the call does not exist on one of the filter's architectures.
        if rc < 0 and -rc not in (errno.EDOM, errno.EFAULT, errno.EEXIST):
            self._ok(rc, f"rule {name}")

    def load(self) -> None:
        """Install the filter on the calling thread (needs CAP_SYS_ADMIN: NNP is not set)."""
        self._ok(self._lib.seccomp_load(self._ctx), "load")


def load() -> None:
    """Build and install the filter at once (for a process that can still reach libseccomp)."""
    Filter().load()
