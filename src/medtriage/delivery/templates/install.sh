#!/bin/sh
# Installs MedTriage @VERSION@ from this folder without a network: every file is checked against
# SHA256SUMS first, then pip installs from wheels/ only (--no-index).
#
#   ./install.sh [PREFIX]        default PREFIX: /opt/medtriage (absolute; letters, digits, / . _ - only)
#   PYTHON=/usr/bin/python@PYTHON@ ./install.sh     to choose the interpreter (it must be Python @PYTHON@)
set -eu

HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
PREFIX=${1:-/opt/medtriage}
PYTHON=${PYTHON:-python@PYTHON@}

fail() { echo "install.sh: error: $*" >&2; exit 1; }

# The units get PREFIX in their ExecStart (through sed): systemd wants an absolute path without spaces or
# specifiers, and a relative one would be taken from the bundle folder, not from where this was started.
case "$PREFIX" in
    /*) ;;
    *) fail "PREFIX '$PREFIX' is not an absolute path. Nothing was installed. Give one such as /opt/medtriage." ;;
esac
case "$PREFIX" in
    *[!A-Za-z0-9/._-]*) fail "PREFIX '$PREFIX' holds characters other than letters, digits, '/', '.', '_' and '-'," \
        "which the systemd units cannot carry. Nothing was installed. Choose a plain path such as /opt/medtriage." ;;
esac
# One spelling of PREFIX ("/opt//medtriage/" is /opt/medtriage): the units carry it, and releases are told apart by it.
PREFIX=$(printf '%s\n' "$PREFIX" | sed 's#//*#/#g; s#\(.\)/$#\1#')
cd "$HERE"

venv="" staging="" committing="" switched=""

# What this bundle puts into PREFIX: each model folder, unit and config example. Each is first copied beside its place
# as a hidden .NAME.new and verified; only then, next to the switch of PREFIX/venv, is it renamed into place, the one it
# replaces stepping aside as .NAME.old until the switch is done. A failure on the way (a full disk, say) leaves PREFIX
# as it was, not new models served by the old release.
each_target() {  # runs "$1 DIR NAME" for each (DIR: models, systemd or config); stops at the first that fails
    for item in models/*/ systemd/*.service config/*; do
        [ -e "$item" ] || continue  # a pattern that matched nothing
        item=${item%/}
        "$1" "${item%%/*}" "${item#*/}" || return
    done
}
UNCHANGED="Nothing was switched: $PREFIX runs what it ran before, and what this run copied there was removed."
stage() {
    staged="$PREFIX/$1/.$2.new"
    rm -rf "$staged" "$PREFIX/$1/.$2.old" || fail "cannot remove $staged or $PREFIX/$1/.$2.old, left by an install that" \
        "was stopped (the reason is above). $UNCHANGED Remove them, then run install.sh again."
    case $1 in
        models) cp -R "models/$2" "$staged" ;;
        systemd) sed "s#/opt/medtriage#$PREFIX#g" "systemd/$2" > "$staged" ;;
        *) cp "$1/$2" "$staged" ;;
    esac || fail "could not copy $HERE/$1/$2 to $staged (the reason is above). $UNCHANGED Check the free space" \
        "(df $PREFIX) and that $PREFIX is writable, then run install.sh again."
    # The copy as it landed on the disk: a full or failing disk can leave a short file without an error. A model's
    # lines of SHA256SUMS are checked inside its copy.
    case $1 in
        models) awk -v dir="models/$2/" 'substr($0, 67, length(dir)) == dir { print substr($0, 1, 66) substr($0, 67 + length(dir)) }' \
            SHA256SUMS | (cd "$staged" && sha256sum --check --strict --quiet) ;;
        systemd) sed "s#/opt/medtriage#$PREFIX#g" "systemd/$2" | cmp -s - "$staged" ;;
        *) cmp -s "$1/$2" "$staged" ;;
    esac || fail "the copy $staged does not match SHA256SUMS or the bundle (the files named above, if any): the disk" \
        "under $PREFIX may be full or failing. $UNCHANGED Check it (df $PREFIX; dmesg), then run install.sh again."
}
commit() {
    if [ -e "$PREFIX/$1/$2" ] || [ -L "$PREFIX/$1/$2" ]; then
        mv "$PREFIX/$1/$2" "$PREFIX/$1/.$2.old" || return
    fi
    mv "$PREFIX/$1/.$2.new" "$PREFIX/$1/$2"
}
restore() {  # undoes stage and commit: the name gets back what it held (nothing, where the bundle added it)
    set -- "$PREFIX/$1/$2" "$PREFIX/$1/.$2.new" "$PREFIX/$1/.$2.old"
    if [ -e "$2" ]; then
        rm -rf "$2"  # not renamed yet (or its rename failed)
    elif [ -n "$committing" ]; then
        rm -rf "$1"  # renamed: the name holds this bundle's
    fi
    if [ -n "$committing" ] && { [ -e "$3" ] || [ -L "$3" ]; } && [ ! -e "$1" ] && [ ! -L "$1" ]; then
        mv "$3" "$1"
    fi
    return 0  # on to the next one whatever happened to this one
}
drop_old() { rm -rf "$PREFIX/$1/.$2.old"; }

echo "checking every file of the bundle against SHA256SUMS"
sha256sum --check --strict --quiet SHA256SUMS ||
    fail "the files named above do not match SHA256SUMS: the bundle was changed or damaged after it was built." \
         "Nothing was installed. Copy the bundle again from its source."
# Anything SHA256SUMS does not list is refused too, links included: pip would install an extra wheel (or one
# a link points to) that it finds in wheels/, and models/, systemd/ and config/ are all copied into PREFIX.
listed=$(mktemp) && present=$(mktemp)
# On any failure or interruption before the switch PREFIX gets back what it held, and the release folder this run made
# goes (a venv holds hundreds of MB); the one PREFIX/venv runs is never it until the switch.
undo() {
    [ -z "$staging" ] || each_target restore
    [ -z "$staging" ] || rm -f "$PREFIX/.venv.new"
    [ -z "$venv" ] || rm -rf "$venv"
}
trap 'rm -f "$listed" "$present"; [ -n "$switched" ] || undo || :' EXIT
trap 'exit 1' HUP INT TERM
sed 's/^[0-9a-f]*  //' SHA256SUMS | LC_ALL=C sort > "$listed"
find . ! -type d ! -path ./SHA256SUMS | sed 's#^\./##' | LC_ALL=C sort > "$present"
unlisted=$(LC_ALL=C comm -13 "$listed" "$present")
[ -z "$unlisted" ] || fail "files not listed in SHA256SUMS: $unlisted. Nothing was installed. Remove them or copy the bundle again."

command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found; install Python @PYTHON@ or set PYTHON=/path/to/python@PYTHON@"
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$have" = "@PYTHON@" ] || fail "this bundle holds wheels for Python @PYTHON@, $PYTHON is Python $have; set PYTHON=/path/to/python@PYTHON@"

# Every install gets a new virtual environment (venvs/VERSION-pyX.Y-TIME; a venv cannot be moved once made): pip in
# an existing one keeps what it holds, so a bundle of the same version with other wheels would change nothing, and
# the running release would be changed in place. PREFIX/venv, which the units run, is switched to it by one rename
# only after everything below passed: a failed install leaves the running one as it was, and the previous release
# stays beside it to switch back to.
live=$(readlink "$PREFIX/venv" 2>/dev/null || true)
mkdir -p "$PREFIX/venvs"
new="$PREFIX/venvs/@VERSION@-py@PYTHON@-$(date -u +%Y%m%dT%H%M%SZ)"
[ ! -e "$new" ] || fail "$new exists: another install started this second. Nothing was installed. Run install.sh again."
mkdir "$new"
venv=$new
echo "installing into $venv"
"$PYTHON" -m venv "$venv"
# No configuration file or PIP_* variable of this machine may add an index or a wheel folder.
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip --isolated install --quiet --no-index \
    --find-links "$HERE/wheels" "medtriage==@VERSION@"

# Each model's sha256 against its model.json, then an ONNX Runtime session: the wheels' native libraries load
# only on a machine that matches the bundle's platform (glibc, CPU), and nothing else here would load them.
check_model='import sys
try:
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import create_session
    package = load_package(sys.argv[1])
    create_session(package)
except Exception as err:
    sys.exit("%s: %s" % (type(err).__name__, err))
print("model", package.describe(), "verified and loaded by ONNX Runtime")'
for package in models/*/; do
    "$venv/bin/python" -c "$check_model" "$package" ||
        fail "the model in $HERE/$package does not load on this machine (the reason is above). Nothing was switched:" \
             "$PREFIX runs what it ran before. The bundle was built for CPython @PYTHON@ on @PLATFORM@: check that this machine matches."
done
# Its own step: inside echo's arguments a failure would go unnoticed.
version=$("$venv/bin/medtriage" --version) ||
    fail "$venv/bin/medtriage does not run (the reason is above). Nothing was switched: $PREFIX runs what it ran" \
         "before. The bundle was built for CPython @PYTHON@ on @PLATFORM@."

# Each model folder is replaced whole (no file of an earlier version of it stays), each unit and config example by
# itself (other files in PREFIX/systemd and PREFIX/config stay).
mkdir -p "$PREFIX/models" "$PREFIX/systemd" "$PREFIX/config" ||
    fail "cannot create the folders of $PREFIX (the reason is above). Nothing was switched: $PREFIX runs what it ran before."
staging=1
each_target stage
ln -sfn "$venv" "$PREFIX/.venv.new" || fail "cannot create $PREFIX/.venv.new (the reason is above). $UNCHANGED"

# The switch, renames only. A PREFIX/venv that is a folder (an install made before venvs/ existed) makes way for the link.
committing=1
each_target commit && { [ -L "$PREFIX/venv" ] || rm -rf "$PREFIX/venv"; } && mv -T "$PREFIX/.venv.new" "$PREFIX/venv" ||
    fail "could not switch $PREFIX to the new release (the reason is above). Nothing was switched: $PREFIX runs what it" \
        "ran before; each model, unit and config example renamed so far was put back. Run install.sh again."
switched=1
each_target drop_old || echo "install.sh: warning: could not remove the replaced copies (.*.old) in $PREFIX/models," \
    "$PREFIX/systemd or $PREFIX/config (the reason is above); remove them by hand" >&2
if command -v systemd-analyze >/dev/null 2>&1; then  # this machine's systemd judges the units it will run (their ExecStart exists now)
    systemd-analyze verify --man=no "$PREFIX"/systemd/*.service ||
        echo "install.sh: warning: systemd-analyze verify found the problems above in $PREFIX/systemd" >&2
fi
for old in "$PREFIX"/venvs/*; do  # keep this release and the one it replaces (-ef: however an earlier install spelt it)
    [ "$old" -ef "$venv" ] || [ "$old" -ef "$live" ] || rm -rf "$old"
done
[ -z "$live" ] || [ ! -e "$live" ] || echo "the previous release stays in $live; to go back to it:" \
    "ln -sfn $live $PREFIX/.venv.new && mv -T $PREFIX/.venv.new $PREFIX/venv"
for package in "$PREFIX"/models/*/; do
    [ -d "models/$(basename "$package")" ] || echo "install.sh: warning: $package is not in this bundle (left by an" \
        "earlier install); remove it (rm -r $package) if that model was withdrawn" >&2
done
echo "installed: $PREFIX/venv/bin/medtriage ($version); next steps: $HERE/README.md"
