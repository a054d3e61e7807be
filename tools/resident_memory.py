"""A process's resident memory from /proc (Linux): the whole, and split into its anonymous
pages and the pages of files it maps.

The benchmarks print the split beside the peak RSS. Most of a process's file-backed
resident memory is its shared libraries' code and read-only data — TensorFlow's
about 300 MiB against PyTorch's about 110 — clean pages that the kernel can drop
and read again under memory pressure; the anonymous pages are the memory the
process allocated: its model, activations, graphs and interpreter.
"""


def _status_mib(pid) -> dict:
    """The memory lines of /proc/PID/status (in kB there), in MiB by name ("VmRSS", ...)."""
    with open(f"/proc/{pid}/status") as handle:
        fields = [line.split() for line in handle]
    return {f[0].rstrip(":"): int(f[1]) / 1024.0 for f in fields if len(f) == 3 and f[2] == "kB"}


def resident_mib(pid: int) -> float:
    """Process `pid`'s resident memory now (VmRSS), in MiB."""
    return _status_mib(pid).get("VmRSS", float("nan"))


def resident_split() -> dict:
    """{"rss_anon_mib": ..., "rss_file_mib": ...} of this process now; {} where the system has
    no /proc."""
    try:
        status = _status_mib("self")
    except OSError:
        return {}
    keys = {"RssAnon": "rss_anon_mib", "RssFile": "rss_file_mib"}
    return {key: round(status[name], 1) for name, key in keys.items() if name in status}
