#!/usr/bin/env bash
# Check the Dockerfile without a Docker engine (CI has none):
#
#   - every COPY/ADD source exists in the build context and is not excluded by
#     .dockerignore (directories must keep at least one file); no source leaves the context;
#   - COPY --from=<stage> names an earlier stage, and the copied path is produced there
#     (named by one of its RUN commands, or copied into it);
#   - files that RUN executes from a stage's filesystem (*.sh, *.py) were copied into it;
#   - every `cargo build` names workspace packages (-p) and binaries (--bin) of those
#     packages, `target/<profile>/<name>` paths name binaries that command builds, and the
#     workspace as the build stage copies it is complete: `cargo metadata --locked` runs
#     on a replica of that stage's files (a member or Cargo.lock left out fails here);
#   - the named binaries build: `cargo build --locked -p ... --bin ...` in the repository
#     (debug profile, so `make test`'s build is reused); --no-build skips this;
#   - the stages `operator` and `node-vmm` exist, and each ENTRYPOINT's program was
#     copied into its stage.
#
# Usage: scripts/check-dockerfile.sh [--no-build] [-f DOCKERFILE] [CONTEXT]
#        scripts/check-dockerfile.sh --self-test
#   CONTEXT defaults to the repository root, DOCKERFILE to CONTEXT/Dockerfile.
#   --self-test breaks copies of the Dockerfile in known ways (a missing COPY source, an
#   unknown binary or package, a source excluded by .dockerignore, an unknown stage, a
#   path no stage produces, a workspace member left out) and fails unless the check
#   rejects each one with the expected message.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

command -v python3 >/dev/null || { echo "check-dockerfile.sh: needs python3 (apt-get install python3)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "check-dockerfile.sh: needs cargo (rustup, see README)" >&2; exit 1; }

exec python3 - "$repo" "$@" <<'PY'
import fnmatch, json, os, re, shlex, shutil, subprocess, sys, tempfile

REPO = sys.argv[1]
EXPECTED_TARGETS = ["operator", "node-vmm"]


class Failure(Exception):
    pass


def log(msg):
    print(f"check-dockerfile.sh: {msg}", file=sys.stderr)


# --- Dockerfile parsing ------------------------------------------------------------

def logical_lines(text):
    """(line number, instruction text) with continuations joined and comments dropped."""
    out, buf, start = [], [], None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if start is None:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        out.append((start, " ".join(s.strip() for s in buf)))
        buf, start = [], None
    if buf:
        out.append((start, " ".join(s.strip() for s in buf)))
    return out


def expand(s, env):
    def sub(m):
        name = m.group(1) or m.group(2)
        return env.get(name, "")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[-+][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, s)


def split_flags(args):
    """Leading --flag=value / --flag value tokens of COPY/ADD/RUN, and the rest."""
    toks = args.strip()
    if toks.startswith("["):
        raise Failure("JSON-form COPY/ADD is not supported by this check; use the shell form")
    parts = shlex.split(toks)
    flags, i = {}, 0
    while i < len(parts) and parts[i].startswith("--"):
        k, _, v = parts[i][2:].partition("=")
        flags.setdefault(k, []).append(v)
        i += 1
    return flags, parts[i:]


def parse(path):
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise Failure(f"cannot read {path}: {e}")
    global_args, stages = {}, []
    for n, line in logical_lines(text):
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        where = f"{os.path.basename(path)}:{n}"
        if instr == "ARG":
            k, _, v = args.strip().partition("=")
            if not stages:
                global_args[k] = v
            else:
                st = stages[-1]
                st["env"][k] = v if v else global_args.get(k, "")
            continue
        if instr == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            image = expand(parts[0], global_args)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"name": name, "image": image, "line": where, "workdir": "/",
                           "env": {}, "steps": [], "index": len(stages)})
            continue
        if not stages:
            raise Failure(f"{where}: {instr} before the first FROM")
        st = stages[-1]
        env = dict(st["env"])
        if instr == "WORKDIR":
            wd = expand(args.strip(), env)
            st["workdir"] = os.path.normpath(os.path.join(st["workdir"], wd))
            st["steps"].append({"op": "WORKDIR", "where": where, "workdir": st["workdir"]})
        elif instr in ("COPY", "ADD"):
            flags, rest = split_flags(expand(args, env))
            if len(rest) < 2:
                raise Failure(f"{where}: {instr} needs a source and a destination")
            st["steps"].append({"op": instr, "where": where, "from": (flags.get("from") or [None])[0],
                                "srcs": rest[:-1], "dest": rest[-1], "workdir": st["workdir"]})
        elif instr == "RUN":
            cmd = args.strip()
            while cmd.startswith("--"):  # RUN --mount=... / --network=...
                cmd = cmd.split(None, 1)[1] if " " in cmd else ""
            st["steps"].append({"op": "RUN", "where": where, "cmd": expand(cmd, env),
                                "workdir": st["workdir"]})
        elif instr == "ENV":
            m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)[= ](.*)", args.strip())
            if m:
                st["env"][m.group(1)] = m.group(2).strip().strip('"')
        elif instr in ("ENTRYPOINT", "CMD"):
            st["steps"].append({"op": instr, "where": where, "args": args.strip()})
    if not stages:
        raise Failure(f"{path}: no FROM")
    return stages


# --- .dockerignore -------------------------------------------------------------------

def pattern_regex(pat):
    out, i = "", 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pat.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pat.find("]", i)
            if j < 0:
                out += re.escape(c)
            else:
                out += "[" + pat[i + 1:j].replace("!", "^", 1) + "]"
                i = j
        elif c == "\\" and i + 1 < len(pat):
            i += 1
            out += re.escape(pat[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def load_ignore(context):
    pats = []
    p = os.path.join(context, ".dockerignore")
    if os.path.exists(p):
        for line in open(p, encoding="utf-8"):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            if neg:
                line = line[1:].strip()
            line = os.path.normpath(line).lstrip("/")
            pats.append((neg, pattern_regex(line)))
    return pats


def ignored(rel, pats):
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    out = False
    for neg, rx in pats:
        if any(rx.match(p) for p in prefixes):
            out = not neg
    return out


# --- sources in the context ----------------------------------------------------------

def context_files(context, src, pats, where):
    """Files (relative to the context) that COPY <src> takes, after .dockerignore."""
    if re.match(r"^[a-z]+://", src):
        return None  # ADD of a URL: not a context file
    rel = os.path.normpath(src.lstrip("/"))
    if rel == ".." or rel.startswith("../"):
        raise Failure(f"{where}: COPY source {src!r} is outside the build context")
    if rel == ".":
        rel = ""
    if any(ch in rel for ch in "*?["):
        rx = pattern_regex(rel)
        matches = []
        for root, dirs, files in os.walk(context):
            for name in dirs + files:
                r = os.path.relpath(os.path.join(root, name), context)
                if rx.match(r):
                    matches.append(r)
        if not matches:
            raise Failure(f"{where}: COPY source {src!r} matches no file in the build context")
        got = []
        for m in matches:
            got += context_files(context, m, pats, where)
        return got
    full = os.path.join(context, rel)
    if not os.path.lexists(full):
        raise Failure(f"{where}: COPY source {src!r} does not exist in the build context ({context})")
    if os.path.isdir(full):
        files = []
        for root, dirs, names in os.walk(full):
            for name in names:
                r = os.path.relpath(os.path.join(root, name), context)
                if not ignored(r, pats):
                    files.append(r)
        if not files:
            raise Failure(f"{where}: COPY source {src!r} is a directory with no file left after .dockerignore")
        return files
    if ignored(rel, pats):
        raise Failure(f"{where}: COPY source {src!r} is excluded by .dockerignore")
    return [rel]


def dest_map(step, context, pats):
    """[(context file, absolute path in the image)] of a COPY without --from."""
    dest = step["dest"]
    if not dest.startswith("/"):
        dest = os.path.join(step["workdir"], dest)
    dest_is_dir = step["dest"].endswith("/") or len(step["srcs"]) > 1
    out = []
    for src in step["srcs"]:
        files = context_files(context, src, pats, step["where"])
        if files is None:
            continue
        base = os.path.normpath(os.path.join(context, src.lstrip("/")))
        if os.path.isdir(base):
            for f in files:
                out.append((f, os.path.normpath(os.path.join(dest, os.path.relpath(os.path.join(context, f), base)))))
        else:
            for f in files:
                target = os.path.join(dest, os.path.basename(f)) if (dest_is_dir or any(ch in src for ch in "*?[")) else dest
                out.append((f, os.path.normpath(target)))
    return out


# --- cargo ---------------------------------------------------------------------------

def cargo_commands(cmd):
    """Argument lists of each `cargo build` in a shell command line."""
    out = []
    for piece in re.split(r"&&|\|\||;|\|", cmd):
        try:
            toks = shlex.split(piece)
        except ValueError:
            continue
        while toks and ("=" in toks[0] and not toks[0].startswith("-")):
            toks = toks[1:]  # VAR=value prefixes
        if len(toks) >= 2 and os.path.basename(toks[0]) == "cargo" and toks[1] in ("build", "b", "install"):
            out.append(toks[2:])
    return out


def parse_cargo_args(args, where):
    pkgs, bins, profile, flags = [], [], "debug", set()
    i = 0
    while i < len(args):
        a = args[i]
        val = None
        if "=" in a and a.startswith("--"):
            a, val = a.split("=", 1)
        def take():
            nonlocal i
            if val is not None:
                return val
            i += 1
            if i >= len(args):
                raise Failure(f"{where}: cargo option {a} needs a value")
            return args[i]
        if a in ("-p", "--package"):
            pkgs.append(take())
        elif a == "--bin":
            bins.append(take())
        elif a == "--release":
            profile = "release"
        elif a == "--profile":
            profile = take()
        elif a in ("--locked", "--frozen", "--offline", "--workspace", "--all", "--bins"):
            flags.add(a)
        elif a in ("--features", "-F", "--target", "--manifest-path", "-j", "--jobs", "--target-dir"):
            flags.add(a)
            take()
        i += 1
    return pkgs, bins, profile, flags


def metadata(cwd, where):
    r = subprocess.run(["cargo", "metadata", "--locked", "--format-version", "1"], cwd=cwd,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"{where}: `cargo metadata --locked` fails on the files this stage copies "
                      f"(a workspace member, Cargo.lock or a source left out?):\n{r.stderr.strip()[-2000:]}")
    m = json.loads(r.stdout)
    ws = set(m["workspace_members"])
    out = {}
    for p in m["packages"]:
        if p["id"] in ws:
            out[p["name"]] = [t["name"] for t in p["targets"] if "bin" in t["kind"]]
    return out


# --- the check -----------------------------------------------------------------------

def check(dockerfile, context, build=True):
    context = os.path.abspath(context)
    pats = load_ignore(context)
    stages = parse(dockerfile)
    names = {}
    for st in stages:
        if st["name"]:
            if st["name"] in names:
                raise Failure(f"{st['line']}: stage name {st['name']!r} used twice")
            names[st["name"]] = st
    for t in EXPECTED_TARGETS:
        if t not in names:
            raise Failure(f"{os.path.basename(dockerfile)}: no stage named {t!r} (docker build --target {t})")
    builds = []  # (where, pkgs, bins, flags)
    checked_copies = 0
    for st in stages:
        produced = []     # absolute paths copied into this stage
        copied_files = []  # (context file, image path) for the replica
        for step in st["steps"]:
            op = step["op"]
            if op in ("COPY", "ADD"):
                src_stage = step["from"]
                if src_stage is None:
                    pairs = dest_map(step, context, pats)
                    copied_files += pairs
                    produced += [d for _, d in pairs]
                    checked_copies += len(step["srcs"])
                    continue
                dest = step["dest"] if step["dest"].startswith("/") else os.path.join(step["workdir"], step["dest"])
                if src_stage.isdigit():
                    k = int(src_stage)
                    if k >= st["index"]:
                        raise Failure(f"{step['where']}: COPY --from={src_stage}: no earlier stage {k}")
                    other = stages[k]
                elif src_stage in names:
                    other = names[src_stage]
                    if other["index"] >= st["index"]:
                        raise Failure(f"{step['where']}: COPY --from={src_stage}: that stage comes later")
                elif ":" in src_stage or "/" in src_stage:
                    log(f"{step['where']}: COPY --from={src_stage} (an image) not checked")
                    continue
                else:
                    raise Failure(f"{step['where']}: COPY --from={src_stage}: no stage of that name "
                                  f"(stages: {', '.join(sorted(names))})")
                for src in step["srcs"]:
                    if not produced_in(other, src):
                        raise Failure(f"{step['where']}: COPY --from={src_stage} {src}: stage {src_stage!r} "
                                      f"neither copies nor names that path in a RUN command")
                    if len(step["srcs"]) > 1 or step["dest"].endswith("/"):
                        produced.append(os.path.join(dest, os.path.basename(src)))
                    else:
                        produced.append(dest)
                checked_copies += len(step["srcs"])
            elif op == "RUN":
                for tok in re.findall(r"(?<![\w$.-])(/?[\w./-]+\.(?:sh|py))\b", step["cmd"]):
                    path = tok if tok.startswith("/") else os.path.normpath(os.path.join(step["workdir"], tok))
                    if not any(path == p or path.startswith(p.rstrip("/") + "/") for p in produced):
                        raise Failure(f"{step['where']}: RUN uses {tok}, which this stage did not copy in")
                for args in cargo_commands(step["cmd"]):
                    pkgs, bins, profile, flags = parse_cargo_args(args, step["where"])
                    if "--locked" not in flags and "--frozen" not in flags:
                        raise Failure(f"{step['where']}: cargo build without --locked: the image could build other dependency versions than Cargo.lock")
                    ws = replica_metadata(copied_files, context, step)
                    for p in pkgs:
                        if p not in ws:
                            raise Failure(f"{step['where']}: cargo build -p {p}: no such workspace package "
                                          f"(packages: {', '.join(sorted(ws))})")
                    sel = pkgs or list(ws)
                    avail = {b for p in sel for b in ws[p]}
                    for b in bins:
                        if b not in avail:
                            raise Failure(f"{step['where']}: cargo build --bin {b}: no binary of that name in "
                                          f"{', '.join(sel)} (binaries: {', '.join(sorted(avail)) or 'none'})")
                    built = set(bins) if bins else avail
                    for m in re.finditer(r"target/([\w.-]+)/([\w.-]+)", step["cmd"]):
                        if m.group(1) != profile:
                            raise Failure(f"{step['where']}: {m.group(0)}: the cargo build above uses profile {profile}")
                        if m.group(2) not in built and m.group(2) not in ("deps", "build"):
                            raise Failure(f"{step['where']}: {m.group(0)} is not a binary that cargo build builds "
                                          f"({', '.join(sorted(built))})")
                    builds.append((step["where"], pkgs, bins))
            elif op == "ENTRYPOINT":
                prog = entry_program(step["args"])
                if prog and prog.startswith("/") and not any(prog == p or prog.startswith(p.rstrip('/') + '/') for p in produced):
                    if st["name"] in EXPECTED_TARGETS:
                        raise Failure(f"{step['where']}: ENTRYPOINT {prog} was not copied into stage {st['name']!r}")
    if not builds:
        raise Failure(f"{os.path.basename(dockerfile)}: no `cargo build` found")
    if build:
        for where, pkgs, bins in builds:
            cmd = ["cargo", "build", "--locked"] + [x for p in pkgs for x in ("-p", p)] + [x for b in bins for x in ("--bin", b)]
            log(f"{where}: {' '.join(cmd)} (debug profile, in {REPO})")
            r = subprocess.run(cmd, cwd=REPO)
            if r.returncode != 0:
                raise Failure(f"{where}: the binaries do not build: {' '.join(cmd)} failed")
    return checked_copies, builds


def produced_in(stage, src):
    src = os.path.normpath(src)
    for step in stage["steps"]:
        if step["op"] == "RUN":
            for m in re.finditer(r"(/[\w./-]+)", step["cmd"]):
                p = os.path.normpath(m.group(1))
                if p != "/" and (src == p or src.startswith(p + "/") or p.startswith(src + "/")):
                    return True
        if step["op"] in ("COPY", "ADD"):
            d = step["dest"] if step["dest"].startswith("/") else os.path.join(step["workdir"], step["dest"])
            d = os.path.normpath(d)
            if src == d or src.startswith(d + "/"):
                return True
    return False


def entry_program(args):
    args = args.strip()
    if args.startswith("["):
        try:
            v = json.loads(args)
            return v[0] if v else None
        except json.JSONDecodeError:
            return None
    return args.split()[0] if args else None


_replicas = {}


def replica_metadata(copied_files, context, step):
    key = (context, step["workdir"], tuple(copied_files))
    if key in _replicas:
        return _replicas[key]
    tmp = tempfile.mkdtemp(prefix="check-dockerfile.")
    try:
        for src, dst in copied_files:
            out = os.path.join(tmp, dst.lstrip("/"))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copy2(os.path.join(context, src), out, follow_symlinks=True)
        cwd = os.path.join(tmp, step["workdir"].lstrip("/"))
        if not os.path.isdir(cwd):
            raise Failure(f"{step['where']}: cargo runs in {step['workdir']}, where nothing was copied")
        ws = metadata(cwd, step["where"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _replicas[key] = ws
    return ws


# --- self test -----------------------------------------------------------------------

def self_test():
    base = open(os.path.join(REPO, "Dockerfile"), encoding="utf-8").read()
    ignore = open(os.path.join(REPO, ".dockerignore"), encoding="utf-8").read()
    cases = [
        ("a COPY source that does not exist",
         lambda d: d.replace("COPY node-vmm/guest/build.sh", "COPY node-vmm/guest/no-such-build.sh", 1),
         None, "does not exist in the build context"),
        ("an unknown binary",
         lambda d: d.replace("--bin corescale-operator", "--bin corescale-operatr", 1),
         None, "no binary of that name"),
        ("an unknown package",
         lambda d: d.replace("-p corescale-node-vmm", "-p corescale-nodevmm", 1),
         None, "no such workspace package"),
        ("a source excluded by .dockerignore",
         None, lambda i: i + "\nnode-vmm/guest\n", "excluded by .dockerignore"),
        ("a COPY --from of an unknown stage",
         lambda d: d.replace("COPY --from=guest", "COPY --from=guests", 1),
         None, "no stage of that name"),
        ("a path the build stage does not produce",
         lambda d: d.replace("COPY --from=build /out/corescale-operator", "COPY --from=build /opt/corescale-operator", 1),
         None, "neither copies nor names that path"),
        ("a workspace member left out of the build stage",
         lambda d: d.replace("COPY common common\n", "", 1),
         None, "cargo metadata --locked"),
        ("a copied binary that cargo does not build",
         lambda d: d.replace("target/release/corescale-node-vmm /out/", "target/release/corescale-launcher /out/", 1),
         None, "is not a binary that cargo build builds"),
        ("a missing target",
         lambda d: d.replace("AS operator", "AS operator-image", 1),
         None, "no stage named 'operator'"),
    ]
    failed = 0
    for name, mut_d, mut_i, expect in cases:
        tmp = tempfile.mkdtemp(prefix="check-dockerfile-self.")
        try:
            ctx = os.path.join(tmp, "ctx")
            # A context replica: the repo's files that matter (cheap: no target/, no .git).
            for entry in os.listdir(REPO):
                if entry in (".git", "target", ".cache"):
                    continue
                src = os.path.join(REPO, entry)
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(ctx, entry), symlinks=True,
                                    ignore=shutil.ignore_patterns("target", ".run"))
                else:
                    os.makedirs(ctx, exist_ok=True)
                    shutil.copy2(src, os.path.join(ctx, entry))
            d = mut_d(base) if mut_d else base
            if d == base and mut_d:
                raise Failure(f"self-test {name!r}: the mutation did not apply (Dockerfile changed?)")
            open(os.path.join(ctx, "Dockerfile"), "w").write(d)
            open(os.path.join(ctx, ".dockerignore"), "w").write(mut_i(ignore) if mut_i else ignore)
            try:
                check(os.path.join(ctx, "Dockerfile"), ctx, build=False)
            except Failure as e:
                if expect in str(e):
                    log(f"self-test ok: {name} -> {str(e).splitlines()[0]}")
                    continue
                log(f"self-test FAILED: {name}: rejected for another reason: {e}")
                failed += 1
                continue
            log(f"self-test FAILED: {name}: the check accepted it")
            failed += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        raise Failure(f"self-test: {failed} of {len(cases)} broken Dockerfiles were not rejected as expected")
    log(f"self-test: all {len(cases)} broken Dockerfiles rejected")


def main(argv):
    build, dockerfile, context, selftest = True, None, None, False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--no-build":
            build = False
        elif a == "--self-test":
            selftest = True
        elif a == "-f":
            i += 1
            if i >= len(argv):
                raise Failure("-f needs a file")
            dockerfile = argv[i]
        elif a in ("-h", "--help"):
            print("usage: check-dockerfile.sh [--no-build] [-f DOCKERFILE] [CONTEXT] | --self-test")
            return 0
        elif a.startswith("-"):
            raise Failure(f"unknown option {a}")
        else:
            context = a
        i += 1
    if selftest:
        self_test()
        return 0
    context = context or REPO
    dockerfile = dockerfile or os.path.join(context, "Dockerfile")
    n, builds = check(dockerfile, context, build)
    bins = sorted({b for _, _, bs in builds for b in bs})
    log(f"ok: {dockerfile}: {n} COPY sources exist, binaries {', '.join(bins)} are workspace binaries"
        + (" and build" if build else ""))
    return 0


try:
    sys.exit(main(sys.argv[2:]))
except Failure as e:
    log(f"error: {e}")
    sys.exit(1)
PY
