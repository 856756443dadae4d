#!/usr/bin/env bash
# A real S3-compatible server (S3Proxy, in-memory buckets) for the object-store tests
# of the feedback store (tests/test_store_url.py, tests/s3_fixtures.py). No mock.
#
#   s3proxy.sh fetch        resolve the server's jars once (Maven, cached)
#   s3proxy.sh classpath    print the java classpath of the fetched jars (fetches first)
#   s3proxy.sh run CONF     exec the server with the properties file CONF (fetches first)
#
# Exit codes: 0 ok, 1 failure, 2 usage, 4 java or mvn missing.
#
# The test fixture writes CONF itself (a free loopback port, throwaway credentials)
# and owns the process: the server lives exactly as long as the test session.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
POM=$HERE/pom.xml

CACHE=${DRIFTLOOP_CACHE:-$REPO/.cache}
VERSION=${DRIFTLOOP_S3PROXY_VERSION:-$(sed -n 's:.*<s3proxy.version>\(.*\)</s3proxy.version>.*:\1:p' "$POM")}
JARS_PARENT=$CACHE/s3proxy/$VERSION
JARS=$JARS_PARENT/jars
HEAP_OPTS=${DRIFTLOOP_S3PROXY_HEAP_OPTS:--Xms64m -Xmx512m}
JVM_OPTS=${DRIFTLOOP_S3PROXY_JVM_OPTS:--XX:+UseSerialGC -XX:-UsePerfData -Djava.awt.headless=true}

die() { echo "s3proxy.sh: $*" >&2; exit 1; }
note() { echo "s3proxy.sh: $*" >&2; }
missing() { echo "s3proxy.sh: $*" >&2; exit 4; }

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  exit 2
}

# What the jars were resolved from; a changed pom.xml or version re-fetches.
fetch_stamp() { echo "s3proxy=$VERSION pom=$(sha256sum "$POM" | cut -c1-16)"; }

jars_ready() {
  [[ -f "$JARS/.complete" && "$(cat "$JARS/.complete")" == "$(fetch_stamp)" ]]
}

cmd_fetch() {
  jars_ready && return 0
  command -v mvn >/dev/null 2>&1 ||
    missing "mvn not found: fetching S3Proxy's jars needs Maven 3.8+ (apt-get install maven)"
  mkdir -p "$JARS_PARENT"
  # One fetch at a time (parallel test sessions share the cache).
  exec 8>"$JARS_PARENT/.fetch.lock"
  command -v flock >/dev/null 2>&1 && flock 8
  if jars_ready; then exec 8>&-; return 0; fi
  note "fetching S3Proxy ${VERSION} jars into $JARS (once)..."
  local t0=$SECONDS tmp
  tmp=$(mktemp -d "$JARS_PARENT/jars.tmp.XXXXXX")
  if ! mvn -B -ntp -f "$POM" \
      -Dmaven.repo.local="${DRIFTLOOP_M2_REPO:-$CACHE/m2}" \
      -Ds3proxy.version="$VERSION" \
      dependency:copy-dependencies -DoutputDirectory="$tmp" >"$JARS_PARENT/fetch.log" 2>&1; then
    rm -rf "$tmp"
    tail -n 40 "$JARS_PARENT/fetch.log" >&2
    die "mvn could not resolve org.gaul:s3proxy:${VERSION} (whole log: $JARS_PARENT/fetch.log)"
  fi
  [[ -f "$tmp/s3proxy-${VERSION}.jar" ]] || { rm -rf "$tmp"; die "mvn ran but s3proxy-${VERSION}.jar is missing"; }
  fetch_stamp >"$tmp/.complete"
  rm -rf "$JARS"
  mv "$tmp" "$JARS"
  exec 8>&-
  note "fetched $(find "$JARS" -name '*.jar' | wc -l) jars in $((SECONDS - t0))s"
}

find_java() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    JAVA=$JAVA_HOME/bin/java
  elif command -v java >/dev/null 2>&1; then
    JAVA=$(command -v java)
  else
    missing "java not found: S3Proxy ${VERSION} needs Java 17+ (apt-get install openjdk-17-jre-headless)"
  fi
}

cmd_run() {
  local conf=${1:-}
  [[ -n "$conf" && -f "$conf" ]] || usage
  find_java
  cmd_fetch
  # Logback's default is DEBUG for everything: tens of thousands of lines per test run.
  # shellcheck disable=SC2086
  exec "$JAVA" $HEAP_OPTS $JVM_OPTS -Dlogback.configurationFile="$HERE/logback.xml" \
    -cp "$JARS/*" org.gaul.s3proxy.Main --properties "$conf"
}

case "${1:-}" in
  fetch) find_java; cmd_fetch ;;
  classpath) cmd_fetch; echo "$JARS/*" ;;
  run) shift; cmd_run "$@" ;;
  *) usage ;;
esac
