/*
 * kernel_times: GPU time per kernel of any CUDA program, without Nsight.
 *
 * The CUDA driver loads this library into a program when CUDA_INJECTION64_PATH names it, and
 * calls InitializeInjection(). That turns on CUPTI's activity records for kernels (graph
 * replays included), memory copies and memsets; at exit it prints, to stderr or to the file
 * named by KERNEL_TIMES_OUT, one line per kernel name sorted by total time:
 *
 *   total_ms  calls  mean_us  share  name
 *
 * and the sum of the kernels' GPU time next to the span from the first start to the last end
 * (the gaps between them are launch or host time the GPU spent idle). KERNEL_TIMES_SHAPES=1
 * keys kernels by name and launch shape, `name <<<grid x,y,z, block x,y,z>>>`: which call of a
 * library kernel such as candle's `fast_sum_f32` costs what.
 *
 * Build: scripts/gpu-prep (cc -shared against the CUPTI headers of NVIDIA's wheel).
 * Run:   CUDA_INJECTION64_PATH=$PWD/libkernel_times.so LD_LIBRARY_PATH=<dir with libcupti.so.13> prog
 */
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NAMES 4096
#define BUF_SIZE (8u << 20)

typedef struct {
  char *name;
  uint64_t calls, total_ns;
} Entry;

static Entry entries[MAX_NAMES];
static int n_entries, shapes;
static uint64_t first_start = UINT64_MAX, last_end, busy_ns, copies, copy_ns, copy_bytes;

static void add(const char *name, uint64_t start, uint64_t end) {
  int i;
  for (i = 0; i < n_entries; i++)
    if (strcmp(entries[i].name, name) == 0) break;
  if (i == n_entries) {
    // Past MAX_NAMES - 1 names the rest share one "[other]" entry: still in the totals.
    if (n_entries >= MAX_NAMES - 1) name = "[other]";
    for (i = 0; i < n_entries; i++)
      if (strcmp(entries[i].name, name) == 0) break;
    if (i == n_entries) {
      entries[i].name = strdup(name);
      n_entries++;
    }
  }
  entries[i].calls++;
  entries[i].total_ns += end - start;
  busy_ns += end - start;
  if (start < first_start) first_start = start;
  if (end > last_end) last_end = end;
}

static void CUPTIAPI requested(uint8_t **buf, size_t *size, size_t *max_records) {
  *buf = aligned_alloc(8, BUF_SIZE);
  *size = *buf ? BUF_SIZE : 0;
  *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size,
                               size_t valid) {
  CUpti_Activity *r = NULL;
  (void)ctx;
  (void)stream;
  (void)size;
  while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
    if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)r;
      const char *name = k->name ? k->name : "?";
      if (shapes) {
        char key[320];
        snprintf(key, sizeof key, "%.200s <<<%d,%d,%d, %d,%d,%d>>>", name, k->gridX, k->gridY,
                 k->gridZ, k->blockX, k->blockY, k->blockZ);
        add(key, k->start, k->end);
      } else {
        add(name, k->start, k->end);
      }
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
      char name[64];
      snprintf(name, sizeof name, "[memcpy kind %u]", (unsigned)m->copyKind);
      add(name, m->start, m->end);
      copies++;
      copy_ns += m->end - m->start;
      copy_bytes += m->bytes;
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
      add("[memset]", m->start, m->end);
    }
  }
  free(buf);
}

static int by_total(const void *a, const void *b) {
  const Entry *x = a, *y = b;
  return x->total_ns < y->total_ns ? 1 : x->total_ns > y->total_ns ? -1 : 0;
}

static void report(void) {
  const char *path = getenv("KERNEL_TIMES_OUT");
  FILE *f = path ? fopen(path, "w") : NULL;
  if (!f) f = stderr;
  cuptiActivityFlushAll(1);
  qsort(entries, n_entries, sizeof entries[0], by_total);
  uint64_t span = last_end > first_start ? last_end - first_start : 0;
  fprintf(f, "kernel_times: %d names, GPU busy %.3f ms over a span of %.3f ms; %llu copies, "
             "%.3f ms, %llu bytes\n",
          n_entries, busy_ns / 1e6, span / 1e6, (unsigned long long)copies, copy_ns / 1e6,
          (unsigned long long)copy_bytes);
  fprintf(f, "%10s %8s %10s %6s  %s\n", "total_ms", "calls", "mean_us", "share", "name");
  for (int i = 0; i < n_entries; i++)
    fprintf(f, "%10.3f %8llu %10.2f %5.1f%%  %.300s\n", entries[i].total_ns / 1e6,
            (unsigned long long)entries[i].calls,
            entries[i].total_ns / 1e3 / (double)entries[i].calls,
            busy_ns ? 100.0 * entries[i].total_ns / busy_ns : 0.0, entries[i].name);
  if (f != stderr) fclose(f);
}

int InitializeInjection(void) {
  const char *sh = getenv("KERNEL_TIMES_SHAPES");
  shapes = sh && strcmp(sh, "1") == 0;
  if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS) return 0;
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(report);
  return 1;
}
