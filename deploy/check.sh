#!/usr/bin/env bash
# Validates the deployment files in deploy/: the systemd unit (systemd-analyze), the
# Kubernetes manifests (every YAML document), the Grafana dashboard (JSON, and every metric
# it queries is one `twtrace serve` exports) and the metrics table in deploy/README.md.
# Exits non-zero on the first failure. Needs: bash, python3 with PyYAML
# (apt-get install python3-yaml), systemd-analyze (apt-get install systemd); uses promtool
# (apt-get install prometheus) to parse the dashboard's PromQL when it is installed.
# Needs no root and leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")"

UNIT=systemd/twtrace.service
MANIFEST=kubernetes/daemonset.yaml
DASHBOARD=grafana/twtrace-dashboard.json
README=README.md

# The metrics `twtrace serve` exports; the dashboard may query these and nothing else.
METRICS="
twtrace_time_wait_sockets
twtrace_port_headroom_ratio
twtrace_connections_per_second
twtrace_port_exhaustion_seconds
twtrace_connect_failures_total
twtrace_events_total
twtrace_lost_events_total
twtrace_bpf_run_seconds_total
twtrace_bpf_runs_total
twtrace_netns_port_range_size
twtrace_netns_tcp_tw_reuse
"

fail() { echo "check.sh: FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
need() { command -v "$1" >/dev/null 2>&1 || fail "$1 not found ($2)"; }

need python3 "apt-get install python3"
python3 -c 'import yaml' 2>/dev/null || fail "python3 cannot import yaml (apt-get install python3-yaml)"
need systemd-analyze "apt-get install systemd"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- systemd -------------------------------------------------------------------------
# `systemd-analyze verify` insists that every Exec*= binary exists, and twtrace is not
# installed where this runs. So verify the unmodified unit inside a scratch root
# (--root): the host's unit directory (for sysinit.target & co.) plus an empty
# executable stub at each Exec*= path. verify exits 0 even on unknown keys or
# unparsable values (it prints "..., ignoring"), so any output is a failure too.
check_unit() {
  local root="$WORK/root" unitdir="" d exe out
  for d in /usr/lib/systemd/system /lib/systemd/system; do
    [ -f "$d/sysinit.target" ] && { unitdir=$d; break; }
  done
  [ -n "$unitdir" ] || fail "no systemd unit directory with sysinit.target on this machine"
  mkdir -p "$root/etc/systemd/system" "$root/usr/bin" "$root/usr/lib/systemd"
  ln -s usr/bin "$root/bin"
  ln -s usr/sbin "$root/sbin"
  cp -r "$unitdir" "$root/usr/lib/systemd/system"
  cp "$UNIT" "$root/etc/systemd/system/"
  # First word of each Exec*= line, without systemd's prefixes (@ - : + !).
  for exe in $(sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\([^ ]*\).*/\1/p' "$UNIT" | sort -u); do
    case $exe in /*) ;; *) fail "$UNIT: Exec path $exe is not absolute" ;; esac
    mkdir -p "$root$(dirname "$exe")"
    printf '#!/bin/sh\nexit 0\n' > "$root$exe"
    chmod 755 "$root$exe"
  done
  out=$(systemd-analyze verify --root="$root" twtrace.service 2>&1) \
    || fail "systemd-analyze verify:"$'\n'"$out"
  [ -z "$out" ] || fail "systemd-analyze verify reported problems:"$'\n'"$out"
  # Unknown capability names are dropped silently by systemd: check each one.
  local cap
  for cap in $(sed -n 's/^\(CapabilityBoundingSet\|AmbientCapabilities\)=~\{0,1\}//p' "$UNIT"); do
    systemd-analyze capability "$cap" >/dev/null 2>&1 || fail "$UNIT: unknown capability $cap"
  done
  # Guard the sandbox against regressions: exposure 3.3 when written ("OK" is below 5);
  # --threshold counts in tenths.
  if systemd-analyze security --help 2>/dev/null | grep -q -- --offline; then
    out=$(systemd-analyze security --offline=yes --root="$root" --threshold=40 twtrace.service 2>&1) \
      || fail "systemd-analyze security: exposure above 4.0:"$'\n'"$(tail -n 3 <<<"$out")"
  fi
  ok "$UNIT (systemd-analyze verify --root=<scratch root with stubs> twtrace.service)"
}

# --- Kubernetes ----------------------------------------------------------------------
check_manifest() {
  python3 - "$MANIFEST" <<'PY' || fail "$MANIFEST"
import sys, yaml
path = sys.argv[1]
try:
    docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
except yaml.YAMLError as e:
    sys.exit(f"{path}: {e}")
if not docs:
    sys.exit(f"{path}: no YAML documents")
seen = set()
for i, d in enumerate(docs, 1):
    if not isinstance(d, dict):
        sys.exit(f"{path}: document {i} is not a mapping")
    for key in ("apiVersion", "kind", "metadata"):
        if key not in d:
            sys.exit(f"{path}: document {i} has no {key}")
    name = (d["metadata"] or {}).get("name")
    if not name:
        sys.exit(f"{path}: document {i} ({d['kind']}) has no metadata.name")
    ident = (d["kind"], d["metadata"].get("namespace"), name)
    if ident in seen:
        sys.exit(f"{path}: {ident} defined twice")
    seen.add(ident)
    if d["kind"] == "DaemonSet":
        for c in d["spec"]["template"]["spec"]["containers"]:
            sc = c.get("securityContext") or {}
            if sc.get("privileged"):
                sys.exit(f"{path}: container {c['name']} is privileged; grant capabilities instead")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                sys.exit(f"{path}: container {c['name']} must drop ALL capabilities before adding")
print(f"ok: {path} ({len(docs)} documents: {', '.join(d['kind'] for d in docs)})")
PY
}

# --- Grafana -------------------------------------------------------------------------
# Parses the dashboard, checks its shape, checks that every twtrace_* name in a query is
# an exported metric, and writes each query as a recording rule for promtool.
check_dashboard() {
  python3 - "$DASHBOARD" "$METRICS" "$WORK/rules.yml" <<'PY' || fail "$DASHBOARD"
import json, re, sys
path, metrics, rules_out = sys.argv[1], set(sys.argv[2].split()), sys.argv[3]
try:
    dash = json.load(open(path))
except ValueError as e:
    sys.exit(f"{path}: not valid JSON: {e}")
if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
    sys.exit(f"{path}: schemaVersion must be >= 36")
if not any(i.get("name") == "DS_PROMETHEUS" for i in dash.get("__inputs", [])):
    sys.exit(f"{path}: no DS_PROMETHEUS input")
if not any(v.get("name") == "instance" for v in dash.get("templating", {}).get("list", [])):
    sys.exit(f"{path}: no 'instance' template variable")

queries = []  # (where, PromQL)
def walk(node, where):
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and ds.get("type") == "prometheus" and ds.get("uid") != "${DS_PROMETHEUS}":
            sys.exit(f"{path}: {where}: datasource uid {ds.get('uid')!r} is not ${{DS_PROMETHEUS}}")
        for key in ("expr", "definition"):
            if isinstance(node.get(key), str):
                queries.append((where, node[key]))
        if isinstance(node.get("query"), str):
            queries.append((where, node["query"]))
        for k, v in node.items():
            walk(v, f"{where}/{node['title']}" if k == "targets" and "title" in node else where)
    elif isinstance(node, list):
        for v in node:
            walk(v, where)
walk(dash, "dashboard")
if not queries:
    sys.exit(f"{path}: no queries found")

unknown = sorted({(w, m) for w, q in queries for m in re.findall(r"\btwtrace_[A-Za-z0-9_:]*", q) if m not in metrics})
if unknown:
    sys.exit(f"{path}: queries use metrics twtrace serve does not export:\n"
             + "\n".join(f"  {m} (in {w})" for w, m in unknown))

# Panel queries as recording rules, with Grafana's variables filled in.
with open(rules_out, "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    n = 0
    for where, q in queries:
        if q.startswith("label_values("):
            continue
        q = q.replace("$__rate_interval", "1m").replace("$instance", ".*")
        n += 1
        f.write(f"      - record: dashboard:query_{n}\n        expr: {json.dumps(q)}\n")
used = {m for _, q in queries for m in re.findall(r"\btwtrace_[A-Za-z0-9_:]*", q)}
print(f"ok: {path} (valid JSON, schemaVersion {dash['schemaVersion']}, {len(queries)} queries, "
      f"metrics used: {len(used)} of {len(metrics)}, all exported)")
PY
  if command -v promtool >/dev/null 2>&1; then
    local out
    out=$(promtool check rules "$WORK/rules.yml" 2>&1) || fail "$DASHBOARD: PromQL does not parse:"$'\n'"$out"
    ok "$DASHBOARD PromQL (promtool check rules)"
  else
    echo "skip: promtool not installed, dashboard PromQL not parsed"
  fi
}

# --- README --------------------------------------------------------------------------
# The metrics table in README.md lists exactly the exported metrics.
check_readme() {
  local documented
  documented=$(grep -o '^| `twtrace_[a-z0-9_]*`' "$README" | tr -d '|` ' | sort)
  [ "$documented" = "$(tr ' ' '\n' <<<"$METRICS" | sed '/^$/d' | sort)" ] \
    || fail "$README: metrics table differs from the list in check.sh:"$'\n'"$(diff <(echo "$documented") <(tr ' ' '\n' <<<"$METRICS" | sed '/^$/d' | sort) || true)"
  ok "$README metrics table"
}

check_unit
check_manifest
check_dashboard
check_readme
echo "deploy/check.sh: all checks passed"
