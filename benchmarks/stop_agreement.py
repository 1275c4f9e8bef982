"""What the agreed stop (`jaxdiff.drivers.loop.StopRequest`) costs a training step on several processes, on the CPU.

    python benchmarks/stop_agreement.py [--processes=2] [--devices=4] [--calls=2000]

Starts --processes processes on 127.0.0.1 joined by jax.distributed (--devices CPU devices each) and times, in each,
`StopRequest.stop_after` with no signal pending, per call, the median of --calls:
  preemption_sync   JAX's preemption sync point (the default): a local check, no communication
  all_gather        jax_enable_preemption_service=False: the stop flags all-gathered across processes (one tiny
                    collective) every `AGREE_EVERY` steps; per step = per exchange / AGREE_EVERY
Prints one table row per mechanism (process 0's figures) with the CPU's model name.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time


def worker(coordinator, num_processes, process_id, calls):
    import jax
    jax.distributed.initialize(coordinator, num_processes, process_id)
    from jaxdiff.drivers import loop
    stop = loop.StopRequest()
    rows = {}
    for mechanism in ('preemption_sync', 'all_gather'):
        stop.mechanism = mechanism
        every = stop.every if mechanism == 'all_gather' else 1
        stop.stop_after(every)              # warm-up (compiles the all-gather)
        times = []
        for call in range(calls):
            done = (call + 1) * every        # a step at which this mechanism does its work
            start = time.perf_counter()
            assert not stop.stop_after(done)
            times.append(time.perf_counter() - start)
        rows[mechanism] = (statistics.median(times), every)
    if process_id == 0:
        for mechanism, (seconds, every) in rows.items():
            print(f'{mechanism}\t{seconds}\t{every}', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--processes', type=int, default=2)
    parser.add_argument('--devices', type=int, default=4)
    parser.add_argument('--calls', type=int, default=2000)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        coordinator = f'127.0.0.1:{s.getsockname()[1]}'
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': str(args.devices)}
    processes = [subprocess.Popen([sys.executable, __file__, '--worker', coordinator, str(args.processes), str(i),
                                   str(args.calls)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True) for i in range(args.processes)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    if any(p.returncode for p in processes):
        sys.exit(f'a worker failed: {[p.returncode for p in processes]}')
    from jaxdiff.bench import speed
    print(f'{speed.cpu_name()}, {os.cpu_count()} cores; {args.processes} processes x {args.devices} CPU devices; '
          f'median of {args.calls} calls')
    print('| mechanism | per call | work every | per step |')
    print('| --- | ---: | ---: | ---: |')
    for line in (l for l in outputs[0].splitlines() if l.count('\t') == 2):
        mechanism, seconds, every = line.split('\t')
        seconds, every = float(seconds), int(every)
        print(f'| {mechanism} | {seconds * 1e6:.1f} us | {every} step{"s" if every > 1 else ""} | '
              f'{seconds / every * 1e6:.1f} us |')


if __name__ == '__main__':
    if sys.argv[1:2] == ['--worker']:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
