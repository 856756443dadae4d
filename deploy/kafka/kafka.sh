#!/usr/bin/env bash
# A real single-node Apache Kafka 4.x broker (KRaft: combined broker+controller,
# no ZooKeeper) for driftloop's tests, benchmarks and demo. No mock anywhere.
#
#   kafka.sh fetch                resolve the broker jars once (Maven, cached)
#   kafka.sh start DIR [PORT]     start a broker whose files live in DIR; prints
#                                 the bootstrap address 127.0.0.1:PORT on stdout
#   kafka.sh stop DIR             SIGTERM, up to DRIFTLOOP_KAFKA_STOP_TIMEOUT s, then SIGKILL
#   kafka.sh status DIR           "running pid=N bootstrap=..." (exit 0) or "stopped" (exit 3)
#
# Exit codes: 0 ok, 1 failure, 2 usage, 3 status: stopped, 4 java, mvn or openssl missing.
#
# DRIFTLOOP_KAFKA_SECURITY=sasl_ssl starts a secured broker instead: clients get a
# SASL_SSL listener (SCRAM-SHA-256, SCRAM-SHA-512, PLAIN) and an mTLS listener, with
# a throwaway CA, keys and credentials in DIR/secure (see README.md here).
#
# Only the bootstrap address goes to stdout; progress and errors go to stderr,
# so callers can do `bootstrap=$(kafka.sh start DIR)`. See README.md here for the
# layout of DIR and the environment variables.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
POM=$HERE/pom.xml

CACHE=${DRIFTLOOP_CACHE:-$REPO/.cache}
KAFKA_VERSION=${DRIFTLOOP_KAFKA_VERSION:-$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")}
HEAP_OPTS=${DRIFTLOOP_KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}
# Serial GC: on a 2-core machine G1's concurrent threads compete with the
# broker's own; with a 512 MiB heap the pauses are a few ms. -UsePerfData saves
# the hsperfdata mmap in /tmp. Overridable for benchmarks that want G1.
JVM_OPTS=${DRIFTLOOP_KAFKA_JVM_OPTS:--XX:+UseSerialGC -XX:-UsePerfData -Djava.awt.headless=true}
# Class-data sharing: a training run after the fetch archives the ~6000 classes
# the broker loads, which cuts every later JVM start by about a third.
CDS=${DRIFTLOOP_KAFKA_CDS:-1}
START_TIMEOUT=${DRIFTLOOP_KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=${DRIFTLOOP_KAFKA_STOP_TIMEOUT:-30}
SECURITY=${DRIFTLOOP_KAFKA_SECURITY:-plaintext}

die() { echo "kafka.sh: $*" >&2; exit 1; }
note() { echo "kafka.sh: $*" >&2; }
# Exit code 4: this machine lacks java or mvn (tests skip on it outside CI).
missing() { echo "kafka.sh: $*" >&2; exit 4; }

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  exit 2
}

abspath() { mkdir -p "$1" && (cd "$1" && pwd -P); }

# ---------------------------------------------------------------- tools ----

JAVA=
JAVA_ID=
find_java() {
  [[ -n "$JAVA" ]] && return 0
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    JAVA=$JAVA_HOME/bin/java
  elif command -v java >/dev/null 2>&1; then
    JAVA=$(command -v java)
  else
    missing "java not found: Kafka ${KAFKA_VERSION} needs Java 17+ (apt-get install openjdk-17-jre-headless)"
  fi
  local props v
  props=$("$JAVA" -XshowSettings:properties -version 2>&1)
  v=$(sed -n 's/^ *java.specification.version = //p' <<<"$props")
  [[ "$v" =~ ^[0-9]+$ ]] || die "could not tell the version of $JAVA"
  (( v >= 17 )) || missing "$JAVA is Java $v: Kafka ${KAFKA_VERSION} needs Java 17+ (apt-get install openjdk-17-jre-headless)"
  # A class-data archive is only valid for the JVM build that wrote it.
  JAVA_ID=$(grep -E '^ *(java\.home|java\.vm\.version|os\.arch) = ' <<<"$props" | sha256sum | cut -c1-12)
}

# Cache layout: $CACHE/kafka/<version>/jars (the classpath) and $CACHE/m2 (the
# Maven local repository, kept so that a new Kafka version resolves quickly).
JARS_PARENT=
JARS=
set_cache_paths() {
  CACHE=$(abspath "$CACHE")
  JARS_PARENT=$CACHE/kafka/$KAFKA_VERSION
  JARS=$JARS_PARENT/jars
}

# What the jars were resolved from; a changed pom.xml or version re-fetches.
fetch_stamp() { echo "kafka=$KAFKA_VERSION pom=$(sha256sum "$POM" | cut -c1-16)"; }

jars_ready() {
  [[ -f "$JARS/.complete" && "$(cat "$JARS/.complete")" == "$(fetch_stamp)" ]]
}

cmd_fetch() {
  set_cache_paths
  if jars_ready; then
    ensure_cds
    return 0
  fi
  command -v mvn >/dev/null 2>&1 ||
    missing "mvn not found: fetching the Kafka jars needs Maven 3.8+ (apt-get install maven)"
  mkdir -p "$JARS_PARENT"
  # One fetch at a time (parallel test sessions share the cache).
  exec 8>"$JARS_PARENT/.fetch.lock"
  command -v flock >/dev/null 2>&1 && flock 8
  if jars_ready; then exec 8>&-; ensure_cds; return 0; fi
  note "fetching Kafka ${KAFKA_VERSION} jars into $JARS (once)..."
  local t0=$SECONDS tmp
  tmp=$(mktemp -d "$JARS_PARENT/jars.tmp.XXXXXX")
  # Maven's output goes to a log, shown only on failure (Debian's Maven 3.8
  # prints stray colour codes even with -q -B).
  if ! mvn -B -ntp -f "$POM" \
      -Dmaven.repo.local="${DRIFTLOOP_M2_REPO:-$CACHE/m2}" \
      -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DoutputDirectory="$tmp" >"$JARS_PARENT/fetch.log" 2>&1; then
    rm -rf "$tmp"
    tail -n 40 "$JARS_PARENT/fetch.log" >&2
    die "mvn could not resolve org.apache.kafka:kafka_2.13:${KAFKA_VERSION} (whole log: $JARS_PARENT/fetch.log)"
  fi
  [[ -f "$tmp/kafka_2.13-${KAFKA_VERSION}.jar" ]] || { rm -rf "$tmp"; die "mvn ran but kafka_2.13-${KAFKA_VERSION}.jar is missing"; }
  fetch_stamp >"$tmp/.complete"
  rm -rf "$JARS"
  mv "$tmp" "$JARS"
  # The class-data archive records the jars' sizes and times: now stale.
  rm -rf "$JARS_PARENT/cds"
  exec 8>&-
  note "fetched $(find "$JARS" -name '*.jar' | wc -l) jars in $((SECONDS - t0))s"
  ensure_cds
}

# The class-data archive of this JVM and these jars: $JARS_PARENT/cds/<jvm>.jsa.
cds_archive() { echo "$JARS_PARENT/cds/$JAVA_ID.jsa"; }

# Writes the archive once per JVM with a training run: a broker in a scratch
# DIR, started with -XX:ArchiveClassesAtExit and stopped; the JVM writes the
# archive as it exits. Any failure only costs the speed-up: start goes on
# without CDS.
ensure_cds() {
  [[ "$CDS" == 1 && -z "${_DRIFTLOOP_CDS_DUMP:-}" ]] || return 0
  find_java
  local archive scratch tmp t0=$SECONDS
  archive=$(cds_archive)
  [[ -f "$archive" || -f "$archive.failed" ]] && return 0
  mkdir -p "$JARS_PARENT/cds"
  exec 8>"$JARS_PARENT/cds/.lock"
  command -v flock >/dev/null 2>&1 && flock 8
  if [[ ! -f "$archive" ]]; then
    note "training run for the class-data archive (once per JVM)..."
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/driftloop-kafka-cds.XXXXXX")
    tmp=$archive.tmp.$$
    if DRIFTLOOP_KAFKA_SECURITY=plaintext _DRIFTLOOP_CDS_DUMP=$tmp "${BASH_SOURCE[0]}" start "$scratch" \
        >/dev/null 2>"$JARS_PARENT/cds/training.log"; then
      DRIFTLOOP_KAFKA_SECURITY=plaintext _DRIFTLOOP_CDS_DUMP=$tmp "${BASH_SOURCE[0]}" stop "$scratch" \
        2>>"$JARS_PARENT/cds/training.log" || true
    fi
    cat "$scratch/logs/kafka.out" >>"$JARS_PARENT/cds/training.log" 2>/dev/null || true
    rm -rf "$scratch"
    if [[ -s "$tmp" ]]; then
      mv "$tmp" "$archive"
      note "class-data archive written in $((SECONDS - t0))s"
    else
      rm -f "$tmp"
      note "no class-data archive (see $JARS_PARENT/cds/training.log): starting without CDS"
      : >"$archive.failed"
    fi
  fi
  exec 8>&-
}

# JVM options for class-data sharing: write the archive in a training run, use
# it otherwise (-Xshare:auto: a stale archive is ignored, not an error).
cds_opts() {
  if [[ -n "${_DRIFTLOOP_CDS_DUMP:-}" ]]; then
    echo "-XX:ArchiveClassesAtExit=$_DRIFTLOOP_CDS_DUMP"
  elif [[ "$CDS" == 1 && -f "$(cds_archive)" ]]; then
    echo "-XX:SharedArchiveFile=$(cds_archive) -Xshare:auto"
  fi
}

# ---------------------------------------------------------------- ports ----

port_in_use() {
  if command -v ss >/dev/null 2>&1; then
    [[ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# A random free port below the kernel's ephemeral range, so that outgoing
# connections never take it between our check and the broker's bind (and a
# restart finds it again).
free_port() {
  local lo=15000 hi eph_lo eph_hi p i
  read -r eph_lo eph_hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || { eph_lo=32768; eph_hi=60999; }
  hi=$((eph_lo - 1))
  if (( hi - lo < 1000 )); then lo=$((eph_hi + 1)); hi=65535; fi
  for ((i = 0; i < 200; i++)); do
    p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo + 1)))
    [[ "$p" == "${1:-}" ]] && continue
    port_in_use "$p" || { echo "$p"; return 0; }
  done
  die "found no free port in $lo-$hi"
}

# A free port that is none of the given ones (which are chosen but not bound yet).
free_port_except() {
  local p
  while :; do
    p=$(free_port)
    [[ " $* " == *" $p "* ]] || { echo "$p"; return 0; }
  done
}

# ------------------------------------------------------------ processes ----

# The pid in DIR/kafka.pid, if that process is alive and is this DIR's broker
# (a stale pid file may name a recycled pid: never signal that one).
running_pid() {
  local dir=$1 pid
  [[ -f "$dir/kafka.pid" ]] || return 1
  pid=$(cat "$dir/kafka.pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "kafka.Kafka $dir/server.properties" || return 1
  echo "$pid"
}

# Alive and not a zombie: the broker is not our child once start returns, and
# whatever reaps it (init, a container's pid 1) may take seconds to do so.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ "${stat:0:1}" != Z ]]
}

log_tail() {
  local dir=$1 f
  for f in "$dir/logs/kafka.out" "$dir/logs/server.log"; do
    [[ -s "$f" ]] || continue
    echo "---- last lines of $f ----" >&2
    tail -n 30 "$f" >&2
  done
}

# A Metadata v4 request (the oldest version Kafka 4 serves) over bash's
# /dev/tcp; ready when the answer lists at least one broker. A KRaft broker
# lists only unfenced brokers, so this is true once it registered with the
# controller and caught up with the metadata log, i.e. once clients can use it.
broker_ready() {
  local port=$1 reply
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  # size=20 | api_key=3 api_version=4 correlation_id=1 client_id="ready" | topics=null allow_auto_create=false
  printf '\x00\x00\x00\x14\x00\x03\x00\x04\x00\x00\x00\x01\x00\x05ready\xff\xff\xff\xff\x00' >&3 || { exec 3>&-; return 1; }
  # size(4) correlation_id(4) throttle_time_ms(4) broker_count(4)
  reply=$(timeout 2 head -c 16 <&3 | od -An -v -tu1 | tr -s ' \n' ' ') || true
  exec 3>&-
  local b
  read -r -a b <<<"$reply"
  (( ${#b[@]} == 16 )) || return 1
  (( b[4] == 0 && b[5] == 0 && b[6] == 0 && b[7] == 1 )) || return 1
  (( (b[12] << 24 | b[13] << 16 | b[14] << 8 | b[15]) >= 1 ))
}

# ------------------------------------------------------------- security ----

# The throwaway PKI and credentials of a secured broker, made once per DIR so that a
# restart keeps them (clients hold the CA and the password): a CA, the broker's
# certificate for 127.0.0.1 and localhost in a PKCS12 keystore, a client certificate
# for the mTLS listener, and the SASL user's password. Fit for a test on loopback only.
ensure_secure_material() {
  local dir=$1 sec=$1/secure store_pass log
  [[ -f "$sec/.complete" ]] && return 0
  command -v openssl >/dev/null 2>&1 ||
    missing "openssl not found: DRIFTLOOP_KAFKA_SECURITY=sasl_ssl needs it (apt-get install openssl)"
  rm -rf "$sec"
  mkdir -p "$sec"
  chmod 700 "$sec"
  log=$dir/logs/openssl.log
  store_pass=$(openssl rand -hex 16)
  (
    set -e
    cd "$sec"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 30 -subj "/CN=driftloop-test-ca" \
      -keyout ca.key -out ca.pem
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >broker.ext
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" -keyout broker.key -out broker.csr
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -sha256 \
      -extfile broker.ext -out broker.pem
    openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker \
      -passout "pass:$store_pass" -out broker.p12
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=driftloop-client" -keyout client.key \
      -out client.csr
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -sha256 \
      -extfile client.ext -out client.pem
    rm -f broker.csr client.csr broker.ext client.ext ca.srl
  ) >"$log" 2>&1 || { cat "$log" >&2; die "generating the test PKI in $sec failed (log: $log)"; }
  echo "$store_pass" >"$sec/keystore.password"
  echo "driftloop" >"$sec/sasl.username"
  openssl rand -hex 16 >"$sec/sasl.password"
  chmod 600 "$sec"/*
  : >"$sec/.complete"
}

# Clients reach a secured broker on SASL_SSL (PORT) or mTLS (MPORT) only. The broker
# talks to itself, and `start` asks it whether it is ready, on an INTERNAL plaintext
# listener on loopback that no client is given: the bash probe cannot speak TLS.
secure_listeners() {
  local port=$2 cport=$3 iport=$4 mport=$5 sec=$1/secure user password
  user=$(cat "$sec/sasl.username")
  password=$(cat "$sec/sasl.password")
  cat <<EOF
listeners=SASL_SSL://127.0.0.1:$port,MTLS://127.0.0.1:$mport,INTERNAL://127.0.0.1:$iport,CONTROLLER://127.0.0.1:$cport
advertised.listeners=SASL_SSL://127.0.0.1:$port,MTLS://127.0.0.1:$mport,INTERNAL://127.0.0.1:$iport
listener.security.protocol.map=SASL_SSL:SASL_SSL,MTLS:SSL,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=INTERNAL
ssl.keystore.type=PKCS12
ssl.keystore.location=$sec/broker.p12
ssl.keystore.password=$(cat "$sec/keystore.password")
ssl.truststore.type=PEM
ssl.truststore.location=$sec/ca.pem
listener.name.mtls.ssl.client.auth=required
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$user="$password";
EOF
}

# The SCRAM credentials go into the metadata log when DIR is formatted: a KRaft
# broker authenticates SCRAM clients from its first start, with no admin call.
scram_args() {
  local sec=$1/secure user password m
  user=$(cat "$sec/sasl.username")
  password=$(cat "$sec/sasl.password")
  for m in SCRAM-SHA-256 SCRAM-SHA-512; do
    printf '%s\n' --add-scram "$m=[name=$user,password=$password]"
  done
}

# ------------------------------------------------------------- configs ----

write_server_properties() {
  local dir=$1 port=$2 cport=$3 iport=${4:-} mport=${5:-} listeners
  if [[ "$SECURITY" == sasl_ssl ]]; then
    listeners=$(secure_listeners "$dir" "$port" "$cport" "$iport" "$mport")
  else
    listeners="listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT"
  fi
  cat >"$dir/server.properties" <<EOF
# Written by deploy/kafka/kafka.sh on every start: change kafka.sh or set
# DRIFTLOOP_KAFKA_PROPS instead of editing this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
controller.listener.names=CONTROLLER
$listeners
log.dirs=$dir/data

# One node: every internal topic with replication factor 1.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Internal topics are made on first use (first consumer group, first
# transaction); 50 partitions each would cost seconds on 2 cores.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
share.coordinator.state.topic.num.partitions=1

# Topics only by explicit creation (monitor.testbed.local_kafka.create_topics).
auto.create.topics.enable=false
num.partitions=1
# A consumer group that forms does so at once, not after 3 s.
group.initial.rebalance.delay.ms=0

# Sized for a 2-core machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
# The broker's first heartbeat gets it unfenced sooner (default 2000 ms).
broker.heartbeat.interval.ms=500
# After a SIGKILL the restarted broker cannot register until the old
# registration expires: 4 s instead of 9 s (still 8 missed heartbeats).
broker.session.timeout.ms=4000
EOF
  if [[ -n "${DRIFTLOOP_KAFKA_PROPS:-}" ]]; then
    printf '\n# From DRIFTLOOP_KAFKA_PROPS (later keys win).\n%s\n' "$DRIFTLOOP_KAFKA_PROPS" >>"$dir/server.properties"
  fi
}

write_log4j2() {
  local dir=$1
  cat >"$dir/log4j2.properties" <<'EOF'
# Written by deploy/kafka/kafka.sh. Everything goes to DIR/logs, nothing to stdout.
status = warn
name = driftloop-kafka
# Keep logging through the broker's own shutdown hook (log4j's hook would race it).
shutdownHook = disable

appender.server.type = RollingFile
appender.server.name = server
appender.server.fileName = ${sys:kafka.logs.dir}/server.log
appender.server.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 50MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 3

rootLogger.level = INFO
rootLogger.appenderRef.server.ref = server

# Chatty at INFO and of no use to a test or a benchmark.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF
}

# ------------------------------------------------------------- commands ----

cmd_start() {
  [[ $# -ge 1 && $# -le 2 ]] || usage
  local dir port="${2:-}" cport="" pid
  dir=$(abspath "$1")
  [[ -z "$port" || "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
  [[ "$SECURITY" == plaintext || "$SECURITY" == sasl_ssl ]] ||
    die "DRIFTLOOP_KAFKA_SECURITY must be plaintext or sasl_ssl, got '$SECURITY'"
  find_java
  cmd_fetch
  mkdir -p "$dir/logs" "$dir/data"

  exec 9>"$dir/.kafka.sh.lock"
  command -v flock >/dev/null 2>&1 && flock 9

  if pid=$(running_pid "$dir"); then
    local running
    running=$(cat "$dir/bootstrap")
    [[ -z "$port" || "$running" == "127.0.0.1:$port" ]] ||
      die "a broker already runs from $dir on $running (pid $pid), not on port $port"
    echo "$running"
    return 0
  fi
  rm -f "$dir/kafka.pid"

  local auto_port=0
  if [[ -z "$port" && -f "$dir/bootstrap" ]]; then
    # Same DIR again: the same address, if nothing else took it meanwhile.
    port=$(sed -n 's/^127\.0\.0\.1:\([0-9]*\)$/\1/p' "$dir/bootstrap")
    if [[ -n "$port" ]] && port_in_use "$port"; then
      note "port $port of the last run is taken now: picking another"
      port=""
    fi
  fi
  if [[ -z "$port" ]]; then
    port=$(free_port)
    auto_port=1
  elif port_in_use "$port"; then
    die "port $port on 127.0.0.1 is already in use"
  fi
  if [[ -f "$dir/server.properties" ]]; then
    cport=$(sed -n 's/^controller\.quorum\.voters=1@127\.0\.0\.1:\([0-9]*\)$/\1/p' "$dir/server.properties")
  fi
  if [[ -z "$cport" || "$cport" == "$port" ]] || port_in_use "$cport"; then
    cport=$(free_port "$port")
  fi

  # A DIR is formatted for one mode: the SCRAM users exist only if it was secured then.
  local mode_file=$dir/formatted-security
  if [[ -f "$dir/data/meta.properties" ]]; then
    local formatted
    formatted=$(cat "$mode_file" 2>/dev/null || echo plaintext)
    [[ "$formatted" == "$SECURITY" ]] ||
      die "$dir was formatted for DRIFTLOOP_KAFKA_SECURITY=$formatted, not $SECURITY: use another DIR"
  fi
  local iport="" mport="" probe_port=$port
  if [[ "$SECURITY" == sasl_ssl ]]; then
    ensure_secure_material "$dir"
    if [[ -f "$dir/server.properties" ]]; then
      iport=$(sed -n 's/^listeners=.*INTERNAL:\/\/127\.0\.0\.1:\([0-9]*\).*$/\1/p' "$dir/server.properties")
      mport=$(sed -n 's/^listeners=.*MTLS:\/\/127\.0\.0\.1:\([0-9]*\).*$/\1/p' "$dir/server.properties")
    fi
    if [[ -z "$iport" || " $port $cport " == *" $iport "* ]] || port_in_use "$iport"; then
      iport=$(free_port_except "$port" "$cport")
    fi
    if [[ -z "$mport" || " $port $cport $iport " == *" $mport "* ]] || port_in_use "$mport"; then
      mport=$(free_port_except "$port" "$cport" "$iport")
    fi
    echo "127.0.0.1:$mport" >"$dir/secure/mtls.bootstrap"
    probe_port=$iport
  fi

  write_server_properties "$dir" "$port" "$cport" "$iport" "$mport"
  write_log4j2 "$dir"
  echo "127.0.0.1:$port" >"$dir/bootstrap"

  local log_opts=(-Dlog4j2.configurationFile="$dir/log4j2.properties" -Dkafka.logs.dir="$dir/logs")

  # Format only once: a restart from the same DIR keeps its topics and offsets.
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    local cid
    cid=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    [[ "$cid" == -* ]] && cid="A${cid:1}"
    # A short-lived tool: the C1 compiler alone starts it faster. It uses the
    # broker's class-data archive but never writes one.
    local tool_cds=""
    [[ -n "${_DRIFTLOOP_CDS_DUMP:-}" ]] || tool_cds=$(cds_opts)
    local scram=()
    [[ "$SECURITY" == sasl_ssl ]] && mapfile -t scram < <(scram_args "$dir")
    # shellcheck disable=SC2086
    if ! "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 $JVM_OPTS $tool_cds "${log_opts[@]}" -cp "$JARS/*" \
        kafka.tools.StorageTool format --cluster-id "$cid" --config "$dir/server.properties" \
        "${scram[@]}" >"$dir/logs/format.log" 2>&1; then
      cat "$dir/logs/format.log" >&2
      die "formatting $dir/data failed"
    fi
    echo "$SECURITY" >"$mode_file"
  fi

  # Not our child once this script exits; SIGHUP ignored so that closing the
  # terminal of a demo does not take the broker down.
  local broker_cds
  broker_cds=$(cds_opts)
  # shellcheck disable=SC2086
  nohup "$JAVA" $HEAP_OPTS $JVM_OPTS $broker_cds "${log_opts[@]}" -cp "$JARS/*" \
    kafka.Kafka "$dir/server.properties" >>"$dir/logs/kafka.out" 2>&1 </dev/null 8>&- 9>&- &
  pid=$!
  echo "$pid" >"$dir/kafka.pid"

  local t0=$SECONDS
  until broker_ready "$probe_port" 2>/dev/null; do
    if ! alive "$pid"; then
      rm -f "$dir/kafka.pid"
      log_tail "$dir"
      if (( auto_port )) && grep -q 'BindException\|Address already in use' "$dir/logs/kafka.out" "$dir/logs/server.log" 2>/dev/null; then
        die "the broker lost a race for port $port or $cport${iport:+, $iport, $mport}: run start again"
      fi
      die "the broker exited during startup (logs in $dir/logs)"
    fi
    if (( SECONDS - t0 >= START_TIMEOUT )); then
      log_tail "$dir"
      cmd_stop "$dir" >/dev/null 2>&1 || true
      die "the broker did not answer on 127.0.0.1:$port within ${START_TIMEOUT}s (logs in $dir/logs)"
    fi
    sleep 0.1
  done
  exec 9>&-
  echo "127.0.0.1:$port"
}

cmd_stop() {
  [[ $# -eq 1 ]] || usage
  local dir pid i
  [[ -d "$1" ]] || return 0
  dir=$(cd "$1" && pwd -P)
  if ! pid=$(running_pid "$dir"); then
    rm -f "$dir/kafka.pid"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    alive "$pid" || break
    sleep 0.05
  done
  if alive "$pid"; then
    note "broker pid $pid ignored SIGTERM for ${STOP_TIMEOUT}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while alive "$pid"; do sleep 0.05; done
  fi
  rm -f "$dir/kafka.pid"
}

cmd_status() {
  [[ $# -eq 1 ]] || usage
  local dir pid
  if [[ -d "$1" ]] && dir=$(cd "$1" && pwd -P) && pid=$(running_pid "$dir"); then
    echo "running pid=$pid bootstrap=$(cat "$dir/bootstrap")"
    return 0
  fi
  echo "stopped"
  return 3
}

case "${1:-}" in
  fetch) shift; [[ $# -eq 0 ]] || usage; cmd_fetch ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
