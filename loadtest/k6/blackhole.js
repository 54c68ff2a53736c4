// The black-hole scenario of plugway-breaker: GET $BASE_URL/api/x at a constant $RATE req/s
// (default 500) for $DURATION (default 40s), while loadtest/blackhole_bench.py makes the
// upstream a black hole and brings it back. Expected answers: 200 (served), 503 (refused by
// the open breaker), 504 (timed out before the breaker opened, and failed probes). Reports
// count, p50 and p99 of each; fails (exit 99) on any other answer, or when refusals take
// 5 ms or more at p99.
//
//   .venv/bin/python loadtest/blackhole_bench.py     # starts everything, runs this, reports
import http from 'k6/http';
import { BASE_URL, constantRate, envNumber, summaryTrendStats } from './lib/options.js';

const STATUSES = ['200', '503', '504'];

http.setResponseCallback(http.expectedStatuses(200, 503, 504));

const thresholds = {
  http_req_failed: ['rate==0'],
  'http_req_duration{status:503}': ['p(99)<5'],
};
for (const status of STATUSES) {
  // A threshold on a tagged sub-metric is what makes k6 keep it for the summary.
  thresholds[`http_reqs{status:${status}}`] = ['count>=0'];
  thresholds[`http_req_duration{status:${status}}`] = thresholds[`http_req_duration{status:${status}}`] || ['max>=0'];
}

export const options = {
  scenarios: {
    // Until the breaker opens, requests wait for the upstream's read timeout: enough VUs for that.
    blackhole: { ...constantRate(envNumber('RATE', 500), __ENV.DURATION || '40s'), preAllocatedVUs: 100, maxVUs: 1000 },
  },
  thresholds: thresholds,
  summaryTrendStats: summaryTrendStats,
};

export default function () {
  http.get(`${BASE_URL}/api/x`);
}

function stat(data, metric, name) {
  const m = data.metrics[metric];
  const value = m && m.values[name];
  return value === undefined ? 'n/a' : (name === 'count' ? String(value) : value.toFixed(2));
}

export function handleSummary(data) {
  const parts = STATUSES.map((status) =>
    `${status}: ${stat(data, `http_reqs{status:${status}}`, 'count')} ` +
    `(p50 ${stat(data, `http_req_duration{status:${status}}`, 'p(50)')} ms, ` +
    `p99 ${stat(data, `http_req_duration{status:${status}}`, 'p(99)')} ms)`);
  const m = data.metrics;
  const failed = m.http_req_failed ? m.http_req_failed.values.passes : 0;
  const dropped = m.dropped_iterations ? m.dropped_iterations.values.count : 0;
  const crossed = Object.entries(m)
    .filter(([, metric]) => metric.thresholds && Object.values(metric.thresholds).some((t) => !t.ok))
    .map(([key]) => key);
  const line = `k6 blackhole.js: ${parts.join('; ')}; other answers ${failed}, dropped ${dropped}, ` +
    (crossed.length ? `thresholds FAILED: ${crossed.join(', ')}` : 'thresholds passed');
  const out = { stdout: line + '\n' };
  if (__ENV.SUMMARY_JSON) out[__ENV.SUMMARY_JSON] = JSON.stringify(data, null, 1);
  return out;
}
