# Shared settings for the scripts (sourced, not run).
# Builds go to $CARGO_TARGET_DIR when set (CI keeps one outside the clone), else ./target.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-auto}"
