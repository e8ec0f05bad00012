# Shared by the setup scripts: Debian packages when needed, and the project's .venv.

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "apt-get not found: install $* by hand" >&2
        return 1
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@"
}

ensure_venv() {  # $1: what to pip-install, e.g. ".[test]"
    if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e "$1"
}
