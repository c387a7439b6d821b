/**
 * The extension's client options against the real server (`python -m difill serve`), without
 * VS Code: the same initializationOptions, didChangeConfiguration payload and
 * workspace/configuration answers the extension sends, over the same stdio command line.
 * Runs when DIFILL_PYTHON names a Python with difill installed (tests/test_vscode.py sets it).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { after, before, test } from 'node:test';
import {
  createProtocolConnection,
  ProtocolConnection,
  StreamMessageReader,
  StreamMessageWriter,
} from 'vscode-languageserver-protocol/node';
import { clientOptions, configurationAnswer, serverExecutable } from '../src/clientOptions';
import { DifillConfiguration, readConfiguration, serverSettings } from '../src/settings';

const python = process.env.DIFILL_PYTHON;
const skip = python ? false : 'set DIFILL_PYTHON to a Python with difill installed';

interface Status {
  model: { state: string; message: string };
  settings: Record<string, unknown>;
  counters: Record<string, number>;
}

let connection: ProtocolConnection;
let current: DifillConfiguration;
let child: ReturnType<typeof spawn>;
let stderr = '';
const configurationRequests: unknown[] = [];

function configure(values: Record<string, unknown>): DifillConfiguration {
  const { config, warnings } = readConfiguration((key) => values[key]);
  assert.deepEqual(warnings, []);
  return config;
}

async function status(): Promise<Status> {
  return connection.sendRequest('difill/status', {}) as Promise<Status>;
}

async function waitFor<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value !== undefined) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}; server stderr:\n${stderr.slice(-2000)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

before(async () => {
  if (!python) {
    return;
  }
  current = configure({
    serverPath: python, serverArgs: ['-m', 'difill', 'serve'], steps: 6, maxTokens: 16, candidates: 2,
    syntaxConstraint: false, debounceMs: 0, languages: ['python'],
  });
  const executable = serverExecutable(current);
  child = spawn(executable.command, executable.args ?? [], { env: executable.options?.env, stdio: 'pipe' });
  child.stderr!.on('data', (data) => { stderr += String(data); });
  connection = createProtocolConnection(new StreamMessageReader(child.stdout!), new StreamMessageWriter(child.stdin!));
  // The extension's middleware answers workspace/configuration with this same function.
  connection.onRequest('workspace/configuration', (params: { items: { section?: string }[] }) => {
    configurationRequests.push(params);
    return configurationAnswer(current, params.items);
  });
  connection.onRequest('window/workDoneProgress/create', () => null);
  connection.listen();
}, { timeout: 60_000 });

after(() => {
  connection?.dispose();
  child?.kill();
});

test('initialize with the extension\'s initializationOptions', { skip, timeout: 180_000 }, async () => {
  const options = clientOptions(() => current, () => undefined);
  const result = await connection.sendRequest('initialize', {
    processId: process.pid,
    rootUri: null,
    capabilities: {
      textDocument: { inlineCompletion: { dynamicRegistration: true }, synchronization: {} },
      workspace: { configuration: true },
      window: { workDoneProgress: true },
    },
    initializationOptions: options.initializationOptions,
  }) as { capabilities: Record<string, unknown> };
  await connection.sendNotification('initialized', {});
  assert.ok(result.capabilities.inlineCompletionProvider, 'the server offers inline completion');
  const commands = (result.capabilities.executeCommandProvider as { commands: string[] }).commands;
  assert.ok(commands.includes('difill.accept'), 'difill.accept is a server command, so VS Code can run it');

  const settings = (await status()).settings;
  for (const [key, value] of Object.entries(serverSettings(current))) {
    assert.deepEqual(settings[key], value, `server setting ${key}`);
  }
});

test('didChangeConfiguration with the extension\'s payload changes the server settings', { skip, timeout: 60_000 },
  async () => {
    current = { ...current, maxTokens: 24, mode: 'line', syntaxConstraint: true };
    await connection.sendNotification('workspace/didChangeConfiguration', { settings: { difill: serverSettings(current) } });
    const settings = await waitFor('the new settings', async () => {
      const s = (await status()).settings;
      return s.maxTokens === 24 ? s : undefined;
    });
    assert.equal(settings.mode, 'line');
    assert.equal(settings.constrainSyntax, true);
  });

test('pull model: the server asks workspace/configuration and gets server keys', { skip, timeout: 60_000 }, async () => {
  current = { ...current, maxTokens: 12, candidates: 1 };
  const asked = configurationRequests.length;
  await connection.sendNotification('workspace/didChangeConfiguration', { settings: null });
  const settings = await waitFor('the pulled settings', async () => {
    const s = (await status()).settings;
    return s.maxTokens === 12 ? s : undefined;
  });
  assert.ok(configurationRequests.length > asked, 'the server asked');
  assert.equal(settings.candidates, 1);
});

test('an inline completion, accepted through its command', { skip, timeout: 180_000 }, async () => {
  await waitFor('the model', async () => {
    const s = await status();
    assert.notEqual(s.model.state, 'failed', s.model.message);
    return s.model.state === 'ready' ? s : undefined;
  });
  const uri = 'file:///tmp/difill-vscode-test/example.py';
  const text = 'def add(a, b):\n    return \n\n\nprint(add(1, 2))\n';
  await connection.sendNotification('textDocument/didOpen', {
    textDocument: { uri, languageId: 'python', version: 1, text },
  });
  const result = await connection.sendRequest('textDocument/inlineCompletion', {
    textDocument: { uri },
    position: { line: 1, character: 11 },
    context: { triggerKind: 1 },
  }) as { insertText: string; range?: unknown; command?: { command: string; arguments: unknown[] } }[] | { items: [] };
  const items = Array.isArray(result) ? result : result.items;
  assert.ok(Array.isArray(items));
  for (const item of items) {
    assert.equal(typeof item.insertText, 'string');
    assert.equal(item.command?.command, 'difill.accept');
  }
  if (items.length > 0) {
    const before = (await status()).counters.accepted ?? 0;
    const accepted = await connection.sendRequest('workspace/executeCommand', {
      command: items[0].command!.command, arguments: items[0].command!.arguments,
    });
    assert.equal(accepted, true);
    assert.equal((await status()).counters.accepted, before + 1);
  }
});

test('shutdown and exit', { skip, timeout: 30_000 }, async () => {
  await connection.sendRequest('shutdown');
  const exited = new Promise<string>((resolve) => child.once('exit', (code, signal) => resolve(`${code} ${signal}`)));
  await connection.sendNotification('exit');
  assert.equal(await exited, '0 null', `exit code and signal; server stderr:\n${stderr.slice(-3000)}`);
});
