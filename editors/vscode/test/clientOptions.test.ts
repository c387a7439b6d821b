import assert from 'node:assert/strict';
import { test } from 'node:test';
import { clientOptions, configurationAnswer, documentSelector, serverExecutable } from '../src/clientOptions';
import { DEFAULTS, DifillConfiguration, readConfiguration, serverSettings } from '../src/settings';

function config(values: Record<string, unknown> = {}): DifillConfiguration {
  const { config, warnings } = readConfiguration((key) => values[key]);
  assert.deepEqual(warnings, []);
  return config;
}

test('the server command is difill serve with the log options', () => {
  const executable = serverExecutable(config(), { PATH: '/usr/bin' });
  assert.equal(executable.command, 'difill');
  assert.deepEqual(executable.args, ['serve', '--log-level', 'WARNING']);
  assert.equal(executable.options?.env?.PATH, '/usr/bin', 'the environment is passed on');
  assert.equal(executable.options?.env?.PYTHONUNBUFFERED, '1');
  assert.equal(executable.transport, undefined, 'stdio');
});

test('a python interpreter with -m difill, and a log file', () => {
  const executable = serverExecutable(config({
    serverPath: '/venv/bin/python', serverArgs: ['-m', 'difill', 'serve'], logLevel: 'DEBUG', logFile: '/tmp/difill.log',
  }), {});
  assert.equal(executable.command, '/venv/bin/python');
  assert.deepEqual(executable.args, ['-m', 'difill', 'serve', '--log-level', 'DEBUG', '--log-file', '/tmp/difill.log']);
});

test('building the command does not change process.env', () => {
  const before = { ...process.env };
  serverExecutable(config());
  assert.deepEqual({ ...process.env }, before);
});

test('the document selector covers files and untitled buffers of each enabled language', () => {
  assert.deepEqual(documentSelector(config({ languages: ['python', 'go'] })), [
    { scheme: 'file', language: 'python' },
    { scheme: 'untitled', language: 'python' },
    { scheme: 'file', language: 'go' },
    { scheme: 'untitled', language: 'go' },
  ]);
  assert.deepEqual(documentSelector(config({ languages: ['*'] })), [{ scheme: 'file' }, { scheme: 'untitled' }]);
  assert.equal(documentSelector(config()).length, 2 * DEFAULTS.languages.length);
});

test('client options carry the mapped settings as initializationOptions', () => {
  const current = config({ steps: 6, syntaxConstraint: false });
  const options = clientOptions(() => current, () => undefined);
  assert.deepEqual(options.initializationOptions, serverSettings(current));
  assert.deepEqual(options.documentSelector, documentSelector(current));
});

test('workspace/configuration is answered with server keys from the current settings', async () => {
  let current = config({ modelPath: '/a' });
  const options = clientOptions(() => current, () => undefined);
  const ask = options.middleware?.workspace?.configuration;
  assert.ok(ask, 'configuration middleware');
  const items = [{ section: 'difill' }, { section: 'difill.maxTokens' }, { section: 'editor' }];
  const next = () => { throw new Error('the difill section must not reach VS Code\'s raw settings'); };
  const first = await ask({ items }, undefined as never, next as never) as unknown[];
  assert.equal((first[0] as { model: string }).model, '/a');
  assert.equal(first[1], null);
  assert.equal(first[2], null);
  current = config({ modelPath: '/b', maxTokens: 20 });
  const second = await ask({ items }, undefined as never, next as never) as unknown[];
  assert.equal((second[0] as { model: string }).model, '/b', 'a settings change is seen without rebuilding the client');
  assert.equal(second[1], 20);
  assert.deepEqual(configurationAnswer(current, [{ section: 'difill.constrainSyntax' }]), [true]);
});

test('a failed initialization is reported once and not retried', () => {
  const messages: string[] = [];
  const options = clientOptions(() => config(), (message) => messages.push(message));
  const retry = options.initializationFailedHandler?.(new Error('spawn difill ENOENT') as never);
  assert.equal(retry, false);
  assert.deepEqual(messages, ['spawn difill ENOENT']);
});
