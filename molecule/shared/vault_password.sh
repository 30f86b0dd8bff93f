#!/bin/sh
# Vault password client for the molecule scenarios (ANSIBLE_VAULT_PASSWORD_FILE points here).
# Prints the password of the sandbox instance's vault once `create` has brought it up; before that
# (syntax, create) nothing is encrypted yet, and a placeholder keeps ansible-playbook from refusing
# to start over a missing password file.
root=$(cd "$(dirname "$0")/../.." && pwd)
file="$root/.sandbox-${SLIPWAY_SANDBOX_INSTANCE:?set SLIPWAY_SANDBOX_INSTANCE}/vault-password"
if [ -r "$file" ]; then
  cat "$file"
else
  echo "no-sandbox-yet"
fi
