#!/usr/bin/env python3
"""Checks Ember's monitoring artefacts: the Prometheus alert rules (deploy/prometheus/*.rules.yml),
their unit tests (deploy/prometheus/tests/*.test.yml), the Grafana dashboards
(deploy/grafana/dashboards/*.json) and their provisioning files.

* Rules: `promtool check rules` on each file and `promtool test rules` on each test file
  (promtool: Debian's `prometheus` package, installed by scripts/install-deps.sh), and every
  alert has a test case in which it fires.

* Dashboards: the structure Grafana needs to import them unchanged: a unique uid and title, a
  schemaVersion, a `datasource` variable of type prometheus that every panel and target uses
  (`${datasource}`, so the dashboards work with any Prometheus data source), unique panel ids,
  a gridPos inside the 24-column grid with no two panels overlapping, and targets with a refId
  and a PromQL expr.
* Every metric an expr, a template variable or an alert rule names exists, with the labels it
  uses. The list of metrics is the generated tables of docs/operations.md (the agent) and
  docs/fleet.md (the fleet): the crates' unit tests keep those equal to the code
  (`metrics::tests::the_docs_list_every_metric_as_*`), so this checks against the code.
  Prometheus's own `up` and the target labels `job` and `instance` are allowed too.

It runs in scripts/test.sh and prints one line per check and a cargo-style
`test result: ok. N passed; M failed` line, which the suite counts. Exit status 1 on a failure.
Needs PyYAML (scripts/requirements.txt, installed by scripts/install-deps.sh).
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import yaml
except ImportError:
    sys.exit("lint-monitoring: PyYAML is missing: python3 -m pip install -r scripts/requirements.txt "
             "(scripts/install-deps.sh does it)")

ROOT = Path(__file__).resolve().parent.parent
DOCS = {"ember-agent metrics": ROOT / "docs/operations.md", "ember-fleet metrics": ROOT / "docs/fleet.md"}
DASHBOARDS = ROOT / "deploy/grafana/dashboards"
PROVISIONING = ROOT / "deploy/grafana/provisioning"
RULES = ROOT / "deploy/prometheus"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# Series Prometheus makes itself.
BUILTIN = {"up": set()}
GRID_COLUMNS = 24
MIN_SCHEMA_VERSION = 36
PANEL_TYPES = {"row", "stat", "timeseries", "table", "gauge", "bargauge", "text", "piechart", "heatmap"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
    "unless", "atan2", "inf", "nan", "start", "end",
}


def metric_families():
    """name -> set of label names, from the generated tables (histograms expanded)."""
    families = {}
    for section, path in DOCS.items():
        text = path.read_text()
        begin, end = f"<!-- BEGIN generated: {section} -->\n", f"<!-- END generated: {section} -->"
        if begin not in text or end not in text:
            raise SystemExit(f"lint-monitoring: {path} has no generated section {section!r}")
        body = text[text.index(begin) + len(begin):text.index(end)]
        rows = [line for line in body.splitlines() if line.startswith("| `")]
        if not rows:
            raise SystemExit(f"lint-monitoring: the section {section!r} of {path} lists no metric")
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            name, kind, labels = cells[0].strip("`"), cells[1], cells[2]
            # "`reason` (`bytes`, `age`)": the values in parentheses are not label names.
            names = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels)))
            if kind == "histogram":
                families[name + "_bucket"] = names | {"le"}
                families[name + "_sum"] = names
                families[name + "_count"] = names
            else:
                families[name] = names
    families.update(BUILTIN)
    return families


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def check_expr(expr, families, where):
    """Problems with the metric names and labels of one PromQL expression."""
    problems = []
    e = strip_strings(expr)
    e = re.sub(r"\$\{?\w+\}?", "", e)  # Grafana variables ($__rate_interval, ${device})
    e = re.sub(r"\[[^\]]*\]", "", e)  # range and subquery selectors
    used = []
    # name{matchers}
    for m in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", e):
        name, matchers = m.group(1), m.group(2)
        if name in PROMQL_KEYWORDS:
            continue
        labels = re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers)
        used.append(name)
        if name in families:
            for label in labels:
                if label not in families[name] | TARGET_LABELS:
                    problems.append(f"{where}: {name} has no label {label!r} (it has {sorted(families[name])})")
    grouping = []
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", e):
        grouping += [g.strip() for g in m.group(2).split(",") if g.strip()]
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(?!\s*\()(?![\w:])", bare):
        token = m.group(1)
        if token in PROMQL_KEYWORDS or re.fullmatch(r"\d\w*", token):
            continue
        used.append(token)
    for name in dict.fromkeys(used):
        if name not in families:
            problems.append(f"{where}: no metric named {name!r} is exported")
    known = set().union(*(families.get(n, set()) for n in used)) | TARGET_LABELS
    for label in grouping:
        if label not in known:
            problems.append(f"{where}: groups by {label!r}, which none of {sorted(set(used))} has")
    if not used:
        problems.append(f"{where}: the expression names no metric: {expr!r}")
    return problems


def overlaps(a, b):
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def check_dashboard(path, families, seen_uids):
    problems = []
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"{path.name}: not JSON: {e}"]
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        if key not in d:
            problems.append(f"{path.name}: no {key!r}")
    if problems:
        return problems
    if d["uid"] in seen_uids:
        problems.append(f"{path.name}: uid {d['uid']!r} is also {seen_uids[d['uid']]}'s")
    seen_uids[d["uid"]] = path.name
    if not isinstance(d["schemaVersion"], int) or d["schemaVersion"] < MIN_SCHEMA_VERSION:
        problems.append(f"{path.name}: schemaVersion {d['schemaVersion']!r} is older than {MIN_SCHEMA_VERSION}")
    if d.get("id") is not None:
        problems.append(f"{path.name}: a provisioned dashboard carries no database id (\"id\": null or absent)")
    variables = {v.get("name"): v for v in d["templating"].get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append(f"{path.name}: no `datasource` variable of type datasource querying prometheus")
    for name, v in variables.items():
        if v.get("type") == "query":
            if v.get("datasource") != DATASOURCE:
                problems.append(f"{path.name}: variable {name!r} does not use {DATASOURCE}")
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            m = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", q or "")
            if not m:
                problems.append(f"{path.name}: variable {name!r}: expected label_values(metric, label), got {q!r}")
            elif m.group(1):
                problems += check_expr(m.group(1), families, f"{path.name} variable {name!r}")
                metric = re.match(r"[a-zA-Z_:][\w:]*", m.group(1)).group(0)
                if m.group(2) not in families.get(metric, set()) | TARGET_LABELS:
                    problems.append(f"{path.name}: variable {name!r}: {metric} has no label {m.group(2)!r}")

    panels = []
    for p in d["panels"]:
        panels.append(p)
        panels += p.get("panels", [])  # a collapsed row keeps its panels inside
    ids = {}
    placed = []
    for p in panels:
        where = f"{path.name} panel {p.get('id')!r} {p.get('title', '')!r}"
        pid = p.get("id")
        if not isinstance(pid, int):
            problems.append(f"{where}: the id is not an integer")
        elif pid in ids:
            problems.append(f"{where}: id {pid} is also panel {ids[pid]!r}'s")
        else:
            ids[pid] = p.get("title")
        if p.get("type") not in PANEL_TYPES:
            problems.append(f"{where}: unknown panel type {p.get('type')!r}")
        if not p.get("title"):
            problems.append(f"{where}: no title")
        g = p.get("gridPos")
        if not isinstance(g, dict) or not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")):
            problems.append(f"{where}: gridPos needs integer h, w, x, y")
        elif g["w"] < 1 or g["h"] < 1 or g["x"] < 0 or g["y"] < 0 or g["x"] + g["w"] > GRID_COLUMNS:
            problems.append(f"{where}: gridPos {g} is outside the {GRID_COLUMNS}-column grid")
        else:
            for other, og in placed:
                if overlaps(g, og):
                    problems.append(f"{where}: overlaps panel {other!r}")
            placed.append((p.get("id"), g))
        if p.get("type") in ("row", "text"):
            continue
        if p.get("datasource") != DATASOURCE:
            problems.append(f"{where}: datasource must be {DATASOURCE}, is {p.get('datasource')!r}")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        refs = set()
        for t in targets:
            ref = t.get("refId")
            if not ref or ref in refs:
                problems.append(f"{where}: target refId {ref!r} missing or repeated")
            refs.add(ref)
            if t.get("datasource", DATASOURCE) != DATASOURCE:
                problems.append(f"{where}: target {ref} uses another datasource {t.get('datasource')!r}")
            if not (t.get("expr") or "").strip():
                problems.append(f"{where}: target {ref} has no expr")
            else:
                problems += check_expr(t["expr"], families, f"{where} target {ref}")
    return problems


def check_provisioning(dashboard_files):
    problems = []
    providers = list((PROVISIONING / "dashboards").glob("*.yml"))
    if not providers:
        problems.append(f"{PROVISIONING}/dashboards: no provider file")
    for f in providers:
        doc = yaml.safe_load(f.read_text())
        for p in doc.get("providers", []):
            if p.get("type") != "file" or not p.get("options", {}).get("path"):
                problems.append(f"{f.name}: provider {p.get('name')!r} is not a file provider with a path")
    for f in (PROVISIONING / "datasources").glob("*.yml"):
        doc = yaml.safe_load(f.read_text())
        for ds in doc.get("datasources", []):
            if ds.get("type") != "prometheus" or not ds.get("url"):
                problems.append(f"{f.name}: data source {ds.get('name')!r} is not a prometheus with a url")
    if not dashboard_files:
        problems.append(f"{DASHBOARDS}: no dashboard")
    return problems


def check_rules(path, families):
    problems = []
    doc = yaml.safe_load(path.read_text())
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            where = f"{path.name} {name}"
            if rule.get("alert") and rule.get("labels", {}).get("severity") not in ("info", "warning", "critical"):
                problems.append(f"{where}: severity must be info, warning or critical")
            if rule.get("alert") and not rule.get("annotations", {}).get("summary"):
                problems.append(f"{where}: no summary annotation")
            problems += check_expr(str(rule.get("expr", "")), families, where)
    return problems


def promtool(*args):
    """Problems reported by one promtool run (its whole output when it fails)."""
    if shutil.which("promtool") is None:
        return ["promtool is not installed: apt-get install prometheus (scripts/install-deps.sh does it)"]
    run = subprocess.run(["promtool", *args], cwd=ROOT, capture_output=True, text=True)
    print(run.stdout + run.stderr, end="")
    return [] if run.returncode == 0 else [f"promtool {' '.join(args)} exited with {run.returncode}"]


def check_alert_coverage():
    """Every alert has a unit test in which it fires (and so its labels and text are pinned)."""
    alerts = set()
    for path in RULES.glob("*.rules.yml"):
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            alerts |= {r["alert"] for r in group.get("rules", []) if "alert" in r}
    fired = set()
    for path in (RULES / "tests").glob("*.test.yml"):
        for test in yaml.safe_load(path.read_text()).get("tests", []):
            fired |= {t["alertname"] for t in test.get("alert_rule_test", []) if t.get("exp_alerts")}
    return [f"alert {a} has no promtool test in which it fires" for a in sorted(alerts - fired)]


def check_self():
    """The checks above catch what they are for (a lint that passes everything proves nothing)."""
    families = {"m_total": {"reason"}, "h_bucket": {"le", "op"}}
    caught = {
        "rate(m_totl[5m])": "no metric named 'm_totl'",
        'm_total{device="d"}': "no label 'device'",
        "sum by (device) (rate(m_total[5m]))": "groups by 'device'",
        "sum by (le, op) (rate(h_bucket[5m])) / other": "no metric named 'other'",
    }
    problems = []
    for expr, expected in caught.items():
        found = check_expr(expr, families, "self-test")
        if not any(expected in p for p in found):
            problems.append(f"the lint did not report {expected!r} for {expr!r} (it said {found})")
    good = 'sum by (reason) (rate(m_total{reason="crc", job="j"}[$__rate_interval])) / 1e6'
    if check_expr(good, families, "self-test"):
        problems.append(f"the lint refused a good expression: {check_expr(good, families, 'self-test')}")
    return problems


def main():
    families = metric_families()
    checks = [("the lint catches unknown metrics and labels", check_self())]
    for path in sorted(RULES.glob("*.rules.yml")):
        checks.append((f"promtool check rules {path.name}", promtool("check", "rules", str(path.relative_to(ROOT)))))
    tests = sorted((RULES / "tests").glob("*.test.yml"))
    if not tests:
        checks.append(("promtool test rules", [f"{RULES}/tests: no rule tests"]))
    for path in tests:
        checks.append((f"promtool test rules {path.name}", promtool("test", "rules", str(path.relative_to(ROOT)))))
    checks.append(("every alert has a test that fires it", check_alert_coverage()))
    seen_uids = {}
    dashboards = sorted(DASHBOARDS.glob("*.json"))
    for path in dashboards:
        checks.append((f"dashboard {path.name}", check_dashboard(path, families, seen_uids)))
    checks.append(("grafana provisioning", check_provisioning(dashboards)))
    for path in sorted(RULES.glob("*.rules.yml")):
        checks.append((f"rules {path.name}", check_rules(path, families)))
    passed = failed = 0
    for name, problems in checks:
        if problems:
            failed += 1
            print(f"test monitoring::{name} ... FAILED")
            for p in problems:
                print(f"    {p}")
        else:
            passed += 1
            print(f"test monitoring::{name} ... ok")
    status = "ok" if failed == 0 else "FAILED"
    print(f"\ntest result: {status}. {passed} passed; {failed} failed; 0 ignored")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
