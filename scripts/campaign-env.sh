# Sourced by the campaign scripts (crash, soak): their Python clients (pinned in
# tests/campaign/requirements.txt) and a broker in $broker: the caller's (TALLYD_TEST_BROKER),
# or a tansu started here and stopped when the script exits.
python3 -c 'import confluent_kafka, matplotlib' 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check -r tests/campaign/requirements.txt >&2
if [ -n "${TALLYD_TEST_BROKER:-}" ]; then
  broker=$TALLYD_TEST_BROKER
else
  broker=$(scripts/broker.sh start)
  trap 'scripts/broker.sh stop' EXIT
fi
