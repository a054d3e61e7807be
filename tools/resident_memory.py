"""A process's resident memory, split into its anonymous pages and the pages of files it maps.

The benchmarks print it beside the peak RSS. Most of a process's file-backed
resident memory is its shared libraries' code and read-only data — TensorFlow's
about 300 MiB against PyTorch's about 110 — clean pages that the kernel can drop
and read again under memory pressure; the anonymous pages are the memory the
process allocated: its model, activations, graphs and interpreter.
"""


def resident_split() -> dict:
    """{"rss_anon_mib": ..., "rss_file_mib": ...} now, from /proc/self/status (Linux); {} where
    the system has no such file."""
    keys = {"RssAnon:": "rss_anon_mib", "RssFile:": "rss_file_mib"}
    try:
        with open("/proc/self/status") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    split = {}
    for line in lines:
        fields = line.split()
        if fields and fields[0] in keys:
            split[keys[fields[0]]] = round(int(fields[1]) / 1024.0, 1)  # kB
    return split
