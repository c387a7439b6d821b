import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { DEFAULTS, DifillConfiguration, needsRestart, readConfiguration, serverSettings } from '../src/settings';

const manifest = JSON.parse(readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8'));
const properties: Record<string, { default: unknown }> = manifest.contributes.configuration.properties;

/** A `get` that answers like workspace.getConfiguration('difill').get for these values. */
function getter(values: Record<string, unknown>): (key: string) => unknown {
  return (key) => values[key];
}

test('package.json declares every setting with the same default as the code', () => {
  const declared = Object.keys(properties).map((key) => key.replace(/^difill\./, '')).sort();
  assert.deepEqual(declared, Object.keys(DEFAULTS).sort());
  for (const [key, value] of Object.entries(DEFAULTS)) {
    assert.deepEqual(properties[`difill.${key}`].default, value, `default of difill.${key}`);
  }
});

test('every default language activates the extension', () => {
  for (const language of DEFAULTS.languages) {
    assert.ok(manifest.activationEvents.includes(`onLanguage:${language}`), language);
  }
});

test('nothing set: the defaults, no warnings', () => {
  const { config, warnings } = readConfiguration(getter({}));
  assert.deepEqual(config, DEFAULTS);
  assert.deepEqual(warnings, []);
});

test('settings are read and mapped onto the server keys', () => {
  const { config, warnings } = readConfiguration(getter({
    modelPath: '/models/difill-small', backend: 'onnx', device: 'cuda', dtype: 'bfloat16', steps: 12, maxTokens: 48, mode: 'line',
    candidates: 3, debounceMs: 120, languages: ['python', 'lua'], syntaxConstraint: false,
  }));
  assert.deepEqual(warnings, []);
  assert.deepEqual(serverSettings(config), {
    model: '/models/difill-small',
    backend: 'onnx',
    device: 'cuda',
    dtype: 'bfloat16',
    steps: 12,
    maxTokens: 48,
    mode: 'line',
    candidates: 3,
    constrainSyntax: false,
    languages: ['python', 'lua'],
    adaptiveDebounce: false,
    debounceMs: 120,
  });
});

test('defaults map to nulls the server reads as its own defaults', () => {
  const settings = serverSettings(readConfiguration(getter({ languages: ['*'] })).config);
  assert.equal(settings.model, null);
  assert.equal(settings.steps, null);
  assert.equal(settings.maxTokens, null);
  assert.equal(settings.languages, null, '["*"] means every language');
  assert.equal(settings.adaptiveDebounce, true);
  assert.ok(!('debounceMs' in settings), 'no fixed debounce unless set');
  assert.deepEqual(JSON.parse(JSON.stringify(settings)), settings, 'survives JSON');
});

test('bad values fall back to the default with a warning naming the setting', () => {
  const { config, warnings } = readConfiguration(getter({
    backend: 'tensorflow', steps: 0, candidates: 2.5, languages: 'python', serverPath: '  ', debounceMs: -5, enable: 'yes',
  }));
  assert.equal(config.backend, 'torch');
  assert.equal(config.steps, null);
  assert.equal(config.candidates, 1);
  assert.deepEqual(config.languages, DEFAULTS.languages);
  assert.equal(config.serverPath, 'difill');
  assert.equal(config.debounceMs, null);
  assert.equal(config.enable, true);
  assert.equal(warnings.length, 7);
  assert.match(warnings.join('\n'), /difill\.backend must be "torch" or "onnx", not "tensorflow"/);
  assert.match(warnings.join('\n'), /difill\.steps must be null or an integer from 1 to 1024, not 0/);
});

test('an empty model path (the Settings UI cannot write null) is the bundled model', () => {
  assert.equal(readConfiguration(getter({ modelPath: '' })).config.modelPath, null);
});

test('reading does not share arrays with the defaults or the caller', () => {
  const languages = ['python'];
  const { config } = readConfiguration(getter({ languages }));
  config.languages.push('go');
  assert.deepEqual(languages, ['python']);
  const fresh = readConfiguration(getter({})).config;
  fresh.languages.push('lua');
  assert.ok(!DEFAULTS.languages.includes('lua'));
});

test('only server command, languages, logging and enable need a restart', () => {
  const base: DifillConfiguration = readConfiguration(getter({})).config;
  const change = (values: Partial<DifillConfiguration>) => ({ ...base, ...values });
  assert.equal(needsRestart(base, change({ steps: 4 })), false);
  assert.equal(needsRestart(base, change({ modelPath: '/m', device: 'cuda' })), false, 'the server reloads the model itself');
  assert.equal(needsRestart(base, change({ languages: ['python'] })), true);
  assert.equal(needsRestart(base, change({ serverPath: '/venv/bin/difill' })), true);
  assert.equal(needsRestart(base, change({ enable: false })), true);
  assert.equal(needsRestart(base, change({ logLevel: 'DEBUG' })), true);
});
