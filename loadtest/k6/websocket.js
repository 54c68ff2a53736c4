// WebSocket echo through the gateway: $VUS connections (default 50), each sending one text message
// every $INTERVAL_MS ms (default 50) and timing its echo, for $DURATION (default 30s); each
// connection sends $MESSAGES messages (default 100), closes, and opens a new one. With $IDLE_VUS
// (default 0), that many more connections are held open and silent for the whole $DURATION.
// Reports the echo round trip (ws_echo_rtt, from Date.now(): whole milliseconds) and k6's own
// ws_ping (a ping relayed to the upstream and its pong back, measured by k6 in microseconds).
// Fails (exit code 99) if an echo came back wrong, a connection failed, or nothing was echoed.
//
//   WS_URL=ws://127.0.0.1:8080/ws/echo .venv/bin/k6 run loadtest/k6/websocket.js
//   .venv/bin/python loadtest/ws_bench.py     # runs it with 10,000 idle proxied connections held open
import { WebSocket } from 'k6/experimental/websockets';
import { setInterval, setTimeout, clearInterval } from 'k6/timers';
import { Counter, Trend } from 'k6/metrics';
import { envNumber } from './lib/options.js';

const URL = __ENV.WS_URL || 'ws://127.0.0.1:8080/ws/echo';
const VUS = envNumber('VUS', 50);
const IDLE_VUS = envNumber('IDLE_VUS', 0);
const DURATION = __ENV.DURATION || '30s';
const INTERVAL_MS = envNumber('INTERVAL_MS', 50);
const MESSAGES = envNumber('MESSAGES', 100);

const rtt = new Trend('ws_echo_rtt', true);
const echoes = new Counter('ws_echoes');
const wrong = new Counter('ws_echo_wrong');
const failures = new Counter('ws_failures');

function milliseconds(text) {
  const match = /^(\d+)(ms|s|m)$/.exec(text);
  if (!match) throw new Error(`DURATION must look like 500ms, 30s or 2m, not ${text}`);
  return Number(match[1]) * { ms: 1, s: 1000, m: 60000 }[match[2]];
}

const scenarios = {
  echo: { executor: 'constant-vus', vus: VUS, duration: DURATION, exec: 'echo', gracefulStop: '10s' },
};
if (IDLE_VUS) {
  scenarios.idle = {
    executor: 'per-vu-iterations', vus: IDLE_VUS, iterations: 1, maxDuration: DURATION, exec: 'idle', gracefulStop: '10s',
  };
}

export const options = {
  scenarios: scenarios,
  thresholds: { ws_echo_wrong: ['count==0'], ws_failures: ['count==0'], ws_echoes: ['count>0'] },
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

export function idle() {
  const ws = new WebSocket(URL);
  let keepalive = null;
  ws.onopen = () => {
    keepalive = setInterval(() => ws.ping(), 10000);
    setTimeout(() => {
      clearInterval(keepalive);
      ws.close();
    }, milliseconds(DURATION) - 1000);
  };
  ws.onerror = () => failures.add(1);
}

function ms(metric, stat) {
  const value = metric && metric.values[stat];
  return value === undefined ? 'n/a' : value.toFixed(2);
}

export function handleSummary(data) {
  const m = data.metrics;
  const line = `k6 websocket.js: ${m.ws_echoes ? m.ws_echoes.values.count : 0} echoes, ` +
    `rtt p50 ${ms(m.ws_echo_rtt, 'med')} ms, p99 ${ms(m.ws_echo_rtt, 'p(99)')} ms, max ${ms(m.ws_echo_rtt, 'max')} ms; ` +
    `ws_ping p50 ${ms(m.ws_ping, 'med')} ms, p99 ${ms(m.ws_ping, 'p(99)')} ms; ` +
    `wrong ${m.ws_echo_wrong ? m.ws_echo_wrong.values.count : 0}, failed ${m.ws_failures ? m.ws_failures.values.count : 0}`;
  const out = { stdout: line + '\n' };
  if (__ENV.SUMMARY_JSON) out[__ENV.SUMMARY_JSON] = JSON.stringify(data, null, 1);
  return out;
}
