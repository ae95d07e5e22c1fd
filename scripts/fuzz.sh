#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 60 s each; FUZZ_SECONDS to change).
# cargo-fuzz's instrumentation flags need RUSTC_BOOTSTRAP on a stable toolchain; no sanitizer is
# used because the stable toolchain ships none, and the targets contain no unsafe code.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
secs=${FUZZ_SECONDS:-60}
for target in $(RUSTC_BOOTSTRAP=1 cargo fuzz list); do
  echo "fuzzing $target for ${secs}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" --sanitizer none -- -max_total_time="$secs"
done
