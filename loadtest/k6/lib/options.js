// Shared helpers for the k6 scenarios in loadtest/k6/.
// k6 costs about 0.5 ms of CPU per request on the 2-core development machines (a quarter of a
// core at 500 req/s), so use it for latency at a fixed, modest rate; use wrk for throughput.

// Where the scenario sends its requests: $BASE_URL without a trailing slash.
export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');

// A positive number from the environment, or the default.
export function envNumber(name, fallback) {
  const value = Number(__ENV[name]);
  return __ENV[name] !== undefined && Number.isFinite(value) && value > 0 ? value : fallback;
}

// Statistics kept for every trend metric (and so available to handleSummary).
export const summaryTrendStats = ['avg', 'min', 'med', 'p(50)', 'p(95)', 'p(99)', 'max'];

// Default pass/fail criteria: no failed request. Scenarios may add their own.
export const thresholds = {
  http_req_failed: ['rate==0'],
};

// A constant-arrival-rate (open loop) scenario: `rate` requests per second for `duration`.
export function constantRate(rate, duration) {
  return {
    executor: 'constant-arrival-rate',
    rate: rate,
    timeUnit: '1s',
    duration: duration,
    preAllocatedVUs: 64,
    maxVUs: 256,
  };
}

function ms(metric, stat) {
  const value = metric && metric.values[stat];
  return value === undefined ? 'n/a' : value.toFixed(2);
}

// One line: latency percentiles, failed and dropped requests, and whether thresholds passed.
export function summaryLine(name, data) {
  const m = data.metrics;
  const reqs = m.http_reqs ? m.http_reqs.values.count : 0;
  const failed = m.http_req_failed ? m.http_req_failed.values.passes : 0;
  const dropped = m.dropped_iterations ? m.dropped_iterations.values.count : 0;
  const crossed = Object.entries(m)
    .filter(([, metric]) => metric.thresholds && Object.values(metric.thresholds).some((t) => !t.ok))
    .map(([key]) => key);
  return `k6 ${name}: p50 ${ms(m.http_req_duration, 'p(50)')} ms, p95 ${ms(m.http_req_duration, 'p(95)')} ms, ` +
    `p99 ${ms(m.http_req_duration, 'p(99)')} ms, max ${ms(m.http_req_duration, 'max')} ms, ` +
    `failed ${failed} of ${reqs}, dropped ${dropped}, ` +
    (crossed.length ? `thresholds FAILED: ${crossed.join(', ')}` : 'thresholds passed');
}

// handleSummary for every scenario: the one line on stdout and, when $SUMMARY_JSON is set, the
// whole summary as JSON in that file (scripts/bench reads it).
export function summary(name) {
  return function handleSummary(data) {
    const out = { stdout: summaryLine(name, data) + '\n' };
    if (__ENV.SUMMARY_JSON) out[__ENV.SUMMARY_JSON] = JSON.stringify(data, null, 1);
    return out;
  };
}
