#!/bin/sh
# Installs MedTriage @VERSION@ from this folder without a network: every file is checked against
# SHA256SUMS first, then pip installs from wheels/ only (--no-index).
#
#   sh install.sh [PREFIX]       default PREFIX: /opt/medtriage (absolute; letters, digits, / . _ - only)
#   PYTHON=/usr/bin/python@PYTHON@ sh install.sh    to choose the interpreter (it must be Python @PYTHON@)
#
# Run through sh, not as ./install.sh: a USB drive or /tmp is often mounted noexec, where no file on it may be
# executed. POSIX sh only (dash runs it): no bash is needed.
set -eu
# What this installs is run and read by the services' own user: a root umask of 027 or 077 (hardened machines) would
# make the venv and the models root-only, and every unit fail to start.
umask 022

HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
PREFIX=${1:-/opt/medtriage}
PYTHON=${PYTHON:-python@PYTHON@}

fail() { echo "install.sh: error: $*" >&2; exit 1; }
[ $# -le 1 ] || fail "install.sh takes one argument, PREFIX, and was given $#. Nothing was installed. Run sh install.sh [PREFIX]."

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
case "$PREFIX/" in
    */../*) fail "PREFIX '$PREFIX' holds a '..' step, which systemd refuses in the units' ExecStart. Nothing was" \
        "installed. Give the path without it, such as /opt/medtriage." ;;
esac
# One spelling of PREFIX ("/opt//./medtriage/" is /opt/medtriage): the units carry it (systemd refuses a '.' step), and
# releases are told apart by it.
PREFIX=$(printf '%s\n' "$PREFIX" | sed 's#//*#/#g; :dot
s#/\./#/#; t dot
s#/\.$##; s#^$#/#; s#\(.\)/$#\1#')
[ ! -e "$PREFIX" ] || [ -d "$PREFIX" ] ||
    fail "PREFIX $PREFIX is not a folder. Nothing was installed. Give the path of a folder, or of one to create."
# Everything goes into PREFIX: a folder its user cannot read, write or enter would stop this run with the shell's words.
[ ! -d "$PREFIX" ] || { [ -r "$PREFIX" ] && [ -w "$PREFIX" ] && [ -x "$PREFIX" ]; } ||
    fail "user $(id -un 2>/dev/null || id -u) cannot read, write or enter PREFIX $PREFIX (see ls -ld $PREFIX, and" \
        "whether it is mounted read-only). Nothing was installed. Run install.sh as a user who can (root for /opt), or" \
        "give a PREFIX that user owns."
# Every file in the bundle is checked against SHA256SUMS: what an install put there would stop every later run.
case "$PREFIX/" in
    "$HERE"/*) fail "PREFIX $PREFIX is inside the bundle $HERE. Nothing was installed. Give one outside it, such as /opt/medtriage." ;;
esac
cd "$HERE"

venv="" staging="" switched="" locked="" made=""

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
item() {  # the paths of item $2 of folder $1 of PREFIX ("." for PREFIX itself): its place, its staged copy, its aside copy
    folder=$PREFIX
    [ "$1" = . ] || folder=$PREFIX/$1
    place=$folder/$2 staged=$folder/.$2.new aside=$folder/.$2.old
}
exists() { [ -e "$1" ] || [ -L "$1" ]; }  # a link that leads nowhere too
NOTHING="(nothing was here)"  # what the aside link of a name the bundle adds leads to
added() { [ "$(readlink "$1" 2>/dev/null)" = "$NOTHING" ]; }
UNCHANGED="Nothing was switched: $PREFIX runs what it ran before, and what this run copied there was removed."
stage() {
    item "$1" "$2"
    rm -rf "$staged" || fail "cannot remove $staged (the reason is above). $UNCHANGED Remove it, then run install.sh again."
    # Readable by all (chmod): the bundle's files keep the modes they had where it was built, 0600 under a umask of 077.
    case $1 in
        models) cp -R "models/$2" "$staged" ;;
        systemd) sed "s#/opt/medtriage#$PREFIX#g" "systemd/$2" > "$staged" ;;
        *) cp "$1/$2" "$staged" ;;
    esac && chmod -R a+rX "$staged" ||
        fail "could not copy $HERE/$1/$2 to $staged (the reason is above). $UNCHANGED Check the free space" \
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
# A file, or the link PREFIX/venv, is never missing: the one in place is linked as .NAME.old (to put back) and the new
# one renamed over it. A folder cannot be renamed over: it steps aside first, and an install stopped between the two
# renames (SIGKILL, a power loss) leaves its name empty until the next run puts it back (recover, below). A name that
# held nothing gets a .NAME.old that says so: putting back empties it.
commit() {
    item "$1" "$2"
    if [ -d "$place" ] && [ ! -L "$place" ]; then
        mv -T "$place" "$aside"
    elif exists "$place"; then
        ln -P "$place" "$aside"
    else
        ln -s "$NOTHING" "$aside"
    fi && mv -T "$staged" "$place"
}
put_back() {  # undoes stage and commit of one item: its name gets back what it held; says what it could not do
    item "$1" "$2"
    rm -rf "$staged" || return  # never in place
    if ! exists "$aside"; then
        return 0
    elif added "$aside"; then
        rm -rf "$place" && rm -f "$aside"
    elif [ "$aside" -ef "$place" ]; then
        rm -f "$aside"  # linked, but the rename over it did not happen
    elif [ -d "$place" ] && [ ! -L "$place" ]; then
        mv -T "$place" "$staged" && mv -T "$aside" "$place" && rm -rf "$staged"  # this bundle's folder makes way
    else
        mv -T "$aside" "$place"
    fi || { echo "install.sh: error: could not put $aside back as $place (the reason is above); run install.sh again," \
        "which does that first, or rename it by hand" >&2; return 1; }
}
restore() { put_back "$1" "$2" || :; }  # each_target's: on to the next one whatever happened to this one
settle() {  # after a switch that finished: what it replaced goes; a copy staged for a switch that never came goes
    item "$1" "$2"
    rm -rf "$staged" || return
    if exists "$place" || added "$aside"; then rm -rf "$aside"; elif exists "$aside"; then mv -T "$aside" "$place"; fi
}
drop_old() { item "$1" "$2" && rm -rf "$aside"; }

# fsync of each file and folder find "$@" names (a link is kept by its folder's): plain sync cannot report a write that
# failed (a failing disk, a full thin-provisioned one), `sync FILE...` can (GNU coreutils 8.24, BusyBox 1.30). An older
# sync ignores its arguments, a path that cannot exist included, and Python's os.fsync does it there. A path named is
# followed where it is a link (-H): PREFIX, or one of its folders, may be a link to another disk's folder.
fsync='import os, sys
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        sys.exit("fsync %s: %s" % (path, err.strerror))'
flush() {
    if sync -- /dev/null/x 2>/dev/null; then  # an older sync: it passed a path that cannot exist
        find -H "$@" \( -type f -o -type d \) -exec "$PYTHON" -c "$fsync" {} +
    else
        find -H "$@" \( -type f -o -type d \) -exec sync -- {} +
    fi
}
flush_staged() { item "$1" "$2" && flush "$staged"; }

# An install stopped where no trap runs (SIGKILL, a power loss) can leave copies staged (.NAME.new) and items renamed
# aside (.NAME.old), a folder's name empty. PREFIX/.venv.new, made after the staging and renamed onto PREFIX/venv by
# the last rename of the switch, tells how far it got: still there, the switch did not finish and everything it
# replaced is put back (the venv last, so that a run stopped while doing this is put back again); gone, it finished,
# and what it replaced goes. Done first, under the lock.
each_left() {  # runs "$1 DIR NAME" for each item an earlier install left staged or aside; stops at the first that fails
    for left in "$PREFIX"/models/.*.new "$PREFIX"/models/.*.old "$PREFIX"/systemd/.*.service.new \
        "$PREFIX"/systemd/.*.service.old "$PREFIX"/config/.*.example.new "$PREFIX"/config/.*.example.old; do
        exists "$left" || continue  # a pattern that matched nothing, or the second name of one done
        name=${left##*/} dir=${left%/*}
        name=${name#.}
        "$1" "${dir##*/}" "${name%.*}" || return
    done
}
recover() {
    if exists "$PREFIX/.venv.new"; then
        echo "install.sh: an install into $PREFIX was stopped during its switch; putting back what it replaced" >&2
        each_left put_back && put_back . venv  # the release it made in venvs/ goes with the next install that passes
    elif exists "$PREFIX/.venv.old" || [ -n "$(each_left echo)" ]; then
        echo "install.sh: an install into $PREFIX was stopped before it had finished; removing what it left" >&2
        each_left settle && settle . venv
    fi
}

# One install into PREFIX at a time: two would each remove the release the other builds in PREFIX/venvs, the copies
# it staged and the copies it put aside. The lock is flock's on the folder itself: it leaves no file behind, and goes
# with this shell (and whatever it started) however that ends.
take_prefix() {
    [ -z "$locked" ] || return 0
    if command -v flock >/dev/null 2>&1; then
        exec 9<"$PREFIX"
        flock -n 9 || fail "another install.sh is installing into $PREFIX (it holds the lock on that folder). Nothing" \
            "was installed. Let it finish (ps -ef | grep install.sh), then run install.sh again if still needed."
    else
        echo "install.sh: warning: flock (util-linux) not found: nothing stops a second install.sh into $PREFIX" \
            "at the same time; run one at a time" >&2
    fi
    locked=1
    recover || fail "could not put back what a stopped install left in $PREFIX (the reason is above). Nothing was" \
        "installed. Put it right by hand (the hidden .NAME.old are what it replaced), then run install.sh again."
}
[ ! -d "$PREFIX" ] || take_prefix

echo "checking every file of the bundle against SHA256SUMS"
sha256sum --check --strict --quiet SHA256SUMS ||
    fail "the files named above do not match SHA256SUMS: the bundle was changed or damaged after it was built." \
         "Nothing was installed. Copy the bundle again from its source."
# Anything SHA256SUMS does not list is refused too, links included: pip would install an extra wheel (or one
# a link points to) that it finds in wheels/, and models/, systemd/ and config/ are all copied into PREFIX.
listed=$(mktemp) && present=$(mktemp)
# mkdir -p of each argument, the folders it makes noted (the last made first) for unmake. PREFIX holds no space or
# pattern character, so the list is split on spaces.
make_folders() {
    for target in "$@"; do
        path=$target missing=""
        while [ -n "$path" ] && ! exists "$path"; do
            missing="$missing $path"
            path=${path%/*}
        done
        made="$missing $made"
        mkdir -p "$target" || return
    done
}
# The folder holding each one this run made, above PREFIX (PREFIX's own are flushed by name).
holders() {
    for folder in $made; do
        case $folder/ in "$PREFIX"/?*) ;; *) echo "${folder%/*}/" ;; esac
    done
}
# The folders this run made go once empty, PREFIX and those above it last: rmdir, never rm -rf, as something else may
# have put a file in one meanwhile. PREFIX and its folders only under the lock: without it, another install that holds
# it may have made PREFIX (both saw it missing) and not yet filled it.
unmake() {
    for folder in $made; do
        case $folder/ in "$PREFIX"/*) [ -n "$locked" ] || continue ;; esac
        rmdir "$folder" 2>/dev/null || :  # not empty: it stays
    done
}
# On any failure or interruption before the switch PREFIX gets back what it held, the release folder this run made
# goes (a venv holds hundreds of MB), then each folder it made that is empty; the one PREFIX/venv runs is never it
# until the switch.
undo() {
    [ -z "$venv" ] || [ ! "$PREFIX/venv" -ef "$venv" ] || return 0  # switched: a signal came right after the last rename
    [ -z "$staging" ] || each_target restore
    [ -z "$staging" ] || put_back . venv || :  # last: until it goes, .venv.new tells a next run to put back the rest
    [ -z "$venv" ] || rm -rf "$venv" || :
    unmake
}
trap 'rm -f "$listed" "$present"; [ -n "$switched" ] || undo || :' EXIT
trap 'exit 1' HUP INT TERM
sed 's/^[0-9a-f]*  //' SHA256SUMS | LC_ALL=C sort > "$listed"
find . ! -type d ! -path ./SHA256SUMS | sed 's#^\./##' | LC_ALL=C sort > "$present"
unlisted=$(LC_ALL=C comm -13 "$listed" "$present")
[ -z "$unlisted" ] || fail "files not listed in SHA256SUMS: $unlisted. Nothing was installed. Remove them or copy the bundle again."
# A listed file that is a link passes sha256sum, which follows it, but cp would install the link: a model that leads out
# of PREFIX to a file that may change or go (the drive the bundle came on). The build writes no link.
links=$(find . -type l | sed 's#^\./##')
[ -z "$links" ] || fail "links in the bundle: $links. A bundle as built holds none. Nothing was installed. Copy the bundle" \
    "again from its source, or with cp -rL (which copies the files they lead to), then run install.sh again."

command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found; install Python @PYTHON@ or set PYTHON=/path/to/python@PYTHON@"
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
    fail "$PYTHON does not run (the reason is above). Nothing was installed: $PREFIX runs what it ran before." \
        "Install Python @PYTHON@ or set PYTHON=/path/to/python@PYTHON@"
[ "$have" = "@PYTHON@" ] || fail "this bundle holds wheels for Python @PYTHON@, $PYTHON is Python $have; set PYTHON=/path/to/python@PYTHON@"

# Every install gets a new virtual environment (venvs/VERSION-pyX.Y-TIME; a venv cannot be moved once made): pip in
# an existing one keeps what it holds, so a bundle of the same version with other wheels would change nothing, and
# the running release would be changed in place. PREFIX/venv, which the units run, is switched to it by one rename
# only after everything below passed: a failed install leaves the running one as it was, and the previous release
# stays beside it to switch back to.
make_folders "$PREFIX" && take_prefix && make_folders "$PREFIX/venvs" ||
    fail "cannot create $PREFIX/venvs (the reason is above). Nothing was installed. Check that $PREFIX, or the folder" \
        "it is to be made in, is writable (as root for /opt), and the free space (df), then run install.sh again."
live=$(readlink "$PREFIX/venv" 2>/dev/null || true)
# Named by the second it is made in. An install run again within that second (from a script), or on a machine whose
# clock was set back, finds the name taken by a release made before, and takes the next free one: an install that
# holds the lock has no other running beside it.
stamp=$(date -u +%Y%m%dT%H%M%SZ) n=1
new="$PREFIX/venvs/@VERSION@-py@PYTHON@-$stamp"
while exists "$new"; do
    n=$((n + 1)) && new="$PREFIX/venvs/@VERSION@-py@PYTHON@-$stamp-$n"
done
mkdir "$new" || fail "cannot create $new (the reason is above). Nothing was installed. Check the free space (df $PREFIX)."
venv=$new
echo "installing into $venv"
"$PYTHON" -m venv "$venv" ||
    fail "$PYTHON could not create a virtual environment in $venv (the reason is above). Nothing was switched: $PREFIX" \
        "runs what it ran before. Where it names ensurepip, install the venv module (python@PYTHON@-venv on Debian and" \
        "Ubuntu); else check the free space (df $PREFIX). Then run install.sh again."
# No configuration file or PIP_* variable of this machine may add an index or a wheel folder.
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip --isolated install --quiet --no-index \
    --find-links "$HERE/wheels" "medtriage==@VERSION@" ||
    fail "pip could not install medtriage from $HERE/wheels (the reason is above). Nothing was switched: $PREFIX runs" \
        "what it ran before. The bundle was built for CPython @PYTHON@ on @PLATFORM@: check that this machine matches."

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
make_folders "$PREFIX/models" "$PREFIX/systemd" "$PREFIX/config" ||
    fail "cannot create the folders of $PREFIX (the reason is above). Nothing was switched: $PREFIX runs what it ran before."
staging=1
each_target stage
ln -sfn "$venv" "$PREFIX/.venv.new" || fail "cannot create $PREFIX/.venv.new (the reason is above). $UNCHANGED"
# The release and the copies on the disk, not only in its cache, before a switch a power loss could keep.
flush "$venv" && each_target flush_staged &&
    flush "$PREFIX" "$PREFIX/venvs" "$PREFIX/models" "$PREFIX/systemd" "$PREFIX/config" -prune ||
    fail "could not flush the new release $venv and the copies staged in $PREFIX to the disk (the reason is above): the" \
        "disk under $PREFIX may be failing or full. $UNCHANGED Check it (df $PREFIX; dmesg), then run install.sh again."

# The switch, renames only; its last one, of .venv.new onto PREFIX/venv, is the point after which the new release runs.
# A PREFIX/venv that is a folder (an install made before venvs/ existed) steps aside like a model folder.
each_target commit && commit . venv ||
    fail "could not switch $PREFIX to the new release (the reason is above). Nothing was switched: $PREFIX runs what it" \
        "ran before; each model, unit and config example renamed so far was put back. Run install.sh again."
switched=1
# The switch on the disk before it is reported, with the name of each folder this run made (in the folder holding it).
flush $(holders) "$PREFIX" "$PREFIX/models" "$PREFIX/systemd" "$PREFIX/config" -prune ||
    fail "$PREFIX runs the new release, but its switch could not be flushed to the disk (the reason is above): the disk" \
        "under $PREFIX may be failing, and a power loss could bring back the release it replaced. Check it (df $PREFIX;" \
        "dmesg), then run install.sh again."
# From here on what fails is said as a warning, and the install still passes.
{ each_target drop_old && drop_old . venv; } || echo "install.sh: warning: could not remove the replaced copies" \
    "(.*.old) in $PREFIX, $PREFIX/models, $PREFIX/systemd or $PREFIX/config (the reason is above); the install is" \
    "complete: remove them by hand" >&2
if command -v systemd-analyze >/dev/null 2>&1; then  # this machine's systemd judges the units it will run (their ExecStart exists now)
    systemd-analyze verify --man=no "$PREFIX"/systemd/*.service ||
        echo "install.sh: warning: systemd-analyze verify found the problems above in $PREFIX/systemd" >&2
fi
# The processes that run release $1: those that mapped a program or library from it, as /proc/PID/maps names it (the
# real path, whatever link PREFIX was reached through); "PID (name) " each. Only root sees every process's maps.
users_of() {
    real=$(cd -P -- "$1" 2>/dev/null && pwd -P) || return 0
    find /proc -mindepth 2 -maxdepth 2 -path '/proc/[0-9]*/maps' -exec grep -l -F -e "$real/" {} + 2>/dev/null |
        while IFS=/ read -r _ _ pid _; do
            printf '%s (%s) ' "$pid" "$(cat "/proc/$pid/comm" 2>/dev/null)"
        done
}
# Keep this release, the one it replaces (-ef: however an earlier install spelt it), and any other a process still runs:
# a service not restarted across two installs runs from the release before the previous one, and would fail at its
# next import or worker start if that went.
for old in "$PREFIX"/venvs/*; do
    { [ "$old" -ef "$venv" ] || [ "$old" -ef "$live" ]; } && continue
    users=$(users_of "$old")
    if [ -n "$users" ]; then
        echo "install.sh: warning: $old, an older release, stays: process(es) ${users}still run from it (systemctl" \
            "status PID names the service). Restart them to run $PREFIX/venv; a later install.sh removes it once none" \
            "does" >&2
        continue
    fi
    rm -rf "$old" || echo "install.sh: warning: could not remove $old, an older release (the reason is above); the" \
        "install is complete: remove it by hand" >&2
done
[ -z "$live" ] || [ ! -e "$live" ] || echo "the previous release stays in $live; to go back to it:" \
    "ln -sfn $live $PREFIX/.venv.back && mv -T $PREFIX/.venv.back $PREFIX/venv"
for package in "$PREFIX"/models/*/; do
    [ -d "models/$(basename "$package")" ] || echo "install.sh: warning: $package is not in this bundle (left by an" \
        "earlier install); remove it (rm -r $package) if that model was withdrawn" >&2
done
echo "installed: $PREFIX/venv/bin/medtriage ($version); next steps: $HERE/README.md"
