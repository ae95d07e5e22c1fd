#!/usr/bin/env bash
# A newcomer follows the README: this takes the two set-up commands from its "Set up and run"
# block and checks that they are the ones the project runs — the second is what .ci/run calls —
# then runs the first non-interactively (`--ci`). If the README and the scripts drift apart, it
# fails. (The second command is the one running this check.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mapfile -t commands < <(awk '/^## Set up and run/{s=1} s&&/^```sh/{b=1;next} b&&/^```/{exit} b{print}' README.md \
  | sed 's/#.*//; s/[[:space:]]*$//' | grep -v '^$')
if [ "${#commands[@]}" -ne 2 ]; then
  echo "README.md: expected exactly two set-up commands, found ${#commands[@]}: ${commands[*]:-none}" >&2
  exit 1
fi
install_and_run=${commands[0]}
run_tests=${commands[1]}
if ! grep -qF "exec $run_tests" .ci/run; then
  echo "README.md's test command '$run_tests' is not what .ci/run runs" >&2
  exit 1
fi
for c in "$install_and_run" "$run_tests"; do
  [ -x "${c%% *}" ] || { echo "README.md names '$c', which is not an executable script" >&2; exit 1; }
done
echo "running the README's first command: $install_and_run --ci"
$install_and_run --ci
