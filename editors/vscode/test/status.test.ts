import assert from 'node:assert/strict';
import { test } from 'node:test';
import { describeProblem, describeStatus } from '../src/status';

test('loading, ready and failed models', () => {
  const loading = describeStatus({ model: { state: 'loading', message: 'loading the bundled model (torch, cpu)' } });
  assert.equal(loading.kind, 'loading');
  assert.match(loading.text, /loading~spin/);
  assert.match(loading.tooltip, /bundled model/);

  const ready = describeStatus({
    model: { state: 'ready', name: 'difill-tiny', parameters: 12_500_000, backend: 'torch', device: 'cpu', loadMs: 2300 },
  });
  assert.equal(ready.kind, 'ready');
  assert.equal(ready.tooltip, 'difill: difill-tiny, torch, cpu 12.5M parameters, loaded in 2.3 s');

  const failed = describeStatus({ model: { state: 'failed', message: 'cannot load the model: /m/config.json: not found' } });
  assert.equal(failed.kind, 'error');
  assert.match(failed.tooltip, /config\.json: not found/);
});

test('an answer of the wrong shape is shown as loading, never thrown', () => {
  for (const answer of [null, undefined, 42, 'x', {}, { model: null }, { model: { state: 7 } }]) {
    assert.equal(describeStatus(answer).kind, 'loading', JSON.stringify(answer));
  }
});

test('problems', () => {
  assert.equal(describeProblem('disabled').kind, 'disabled');
  assert.match(describeProblem('error', 'spawn difill ENOENT').tooltip, /ENOENT/);
  assert.match(describeProblem('stopped').text, /disconnect/);
});
