#!/usr/bin/env bash
# Validate docker-compose.yml offline; no Docker engine is needed.
#
#   bash scripts/validate_compose.sh [FILE]      (default: docker-compose.yml at the repo root)
#
# 1. Always: the compose specification's JSON schema, via check-jsonschema (PyPI, a dev
#    extra; run from the project's venv or set PYTHON=/path/to/python).
# 2. Always: top-level keys limited to those docker-compose v1 accepts too (no `name:`,
#    no obsolete `version:`), so the file works with both v1 and v2.
# 3. When the binary exists: `docker-compose config -q` (v1.29, e.g. the Debian package)
#    and `docker compose config -q` (v2 plugin). Either absent is not a failure.
#
# Exit status: 0 all checks that could run passed, 1 a check failed, 2 a required tool
# is missing.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
file=${1:-docker-compose.yml}
if [[ ! -f $file ]]; then
    echo "validate_compose: $file: no such file" >&2
    exit 2
fi

failed=0
fail() {
    echo "validate_compose: FAIL: $*" >&2
    failed=1
}

# --- 1. compose-spec JSON schema --------------------------------------------------------
jsonschema=()
for py in ${PYTHON:+"$PYTHON"} python python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import check_jsonschema' >/dev/null 2>&1; then
        jsonschema=("$py" -m check_jsonschema)
        break
    fi
done
if [[ ${#jsonschema[@]} -eq 0 ]] && command -v check-jsonschema >/dev/null 2>&1; then
    jsonschema=(check-jsonschema)
fi
if [[ ${#jsonschema[@]} -eq 0 ]]; then
    echo "validate_compose: check-jsonschema not found: install the dev extras" \
        "(pip install -e '.[dev]') or set PYTHON to a python that has it" >&2
    exit 2
fi
echo "== ${jsonschema[*]} --builtin-schema vendor.compose-spec $file"
"${jsonschema[@]}" --builtin-schema vendor.compose-spec "$file" || fail "compose-spec schema"

# --- 2. top-level keys both docker-compose v1 and v2 accept -----------------------------
echo "== top-level keys"
before=$failed
while IFS= read -r key; do
    case $key in
        services | networks | volumes | secrets | configs | x-*) ;;
        name) fail "top-level 'name:' is compose-spec only: docker-compose v1 rejects it" ;;
        version) fail "top-level 'version:' is obsolete in the compose spec: drop it" ;;
        *) fail "top-level key '$key' is not portable between docker-compose v1 and v2" ;;
    esac
done < <(grep -E '^[^[:space:]#-][^:]*:' "$file" | sed -E 's/^["'\'']?([^:"'\'']*)["'\'']?:.*/\1/')
[[ $failed -eq "$before" ]] && echo "ok -- top-level keys portable"

# --- 3. docker-compose v1 / docker compose v2, when present ----------------------------
if command -v docker-compose >/dev/null 2>&1; then
    echo "== docker-compose -f $file config -q ($(docker-compose version --short 2>/dev/null || echo '?'))"
    if docker-compose -f "$file" config -q; then
        echo "ok -- docker-compose config"
    else
        fail "docker-compose config"
    fi
else
    echo "== docker-compose: not installed, skipped"
fi
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    echo "== docker compose -f $file config -q"
    if docker compose -f "$file" config -q; then
        echo "ok -- docker compose config"
    else
        fail "docker compose config"
    fi
else
    echo "== docker compose (v2 plugin): not available, skipped"
fi

if [[ $failed -ne 0 ]]; then
    echo "validate_compose: $file is NOT valid" >&2
    exit 1
fi
echo "validate_compose: $file is valid"
