#!/usr/bin/env bash
# The token loop people write by hand, in a shell: one `curl` per login, then the token is
# written to a temporary file and renamed over the old one (`mv`, atomic within a directory).
# Same inputs as the sidecar's `once`: a customers file of
# `name<TAB>username<TAB>password_file` lines.
#
# Usage: curl_loop.sh BASE_URL CUSTOMERS_TSV OUT_DIR
# Exit status 0 when every token was written, 1 otherwise.
set -u
base_url=$1 customers=$2 out_dir=$3
umask 077
failed=0
while IFS=$'\t' read -r name username password_file; do
    [ -n "$name" ] || continue
    IFS= read -r password < "$password_file" || [ -n "$password" ] || { failed=1; continue; }
    if token=$(curl -sS --fail --max-time 10 \
        -H 'Content-Type: application/json' -H 'Accept: application/json' \
        -d "{\"username\":\"$username\",\"password\":\"$password\"}" \
        "$base_url/rest/V1/integration/customer/token"); then
        token=${token#\"} token=${token%\"}
        tmp="$out_dir/.$name.$$.tmp"
        printf '%s' "$token" > "$tmp" && mv -f "$tmp" "$out_dir/$name" || failed=1
    else
        echo "login failed: $name" >&2
        failed=1
    fi
done < "$customers"
exit "$failed"
