"""Write the example corpus under examples/corpus/ (and examples/queries.jsonl), deterministically.

    python examples/make_corpus.py            # rewrites the committed files byte for byte
    python examples/make_corpus.py --out DIR  # somewhere else

60 short documents (20 English, 20 Chinese, 20 code snippets) in three shards, one per input format the pipeline
reads: ``docs-000.jsonl``, ``docs-001.jsonl.gz`` and ``docs-002.parquet``. Every row has the columns
``id`` (int), ``text`` (str), ``lang`` (str: en, zh or code) and ``url`` (str). No randomness, no timestamps: the gzip
header carries mtime 0 and no file name, so a rerun produces identical bytes (given the same pyarrow for Parquet).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))

EN = [
    "Beijing is the capital of China and one of the most populous cities in the world.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions.",
    "A vector database stores embeddings and answers nearest-neighbour queries quickly.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level.",
    "Gradient descent updates model parameters in the direction that lowers the loss.",
    "The human heart pumps blood through the body via a network of arteries and veins.",
    "Shakespeare wrote Hamlet around 1600; it is his longest play.",
    "Water boils at 100 degrees Celsius at sea level and at lower temperatures at altitude.",
    "Transformers replaced recurrent networks for most language tasks after 2017.",
    "The Great Wall of China stretches for thousands of kilometres across northern China.",
    "Object storage such as Amazon S3 addresses data by bucket and key rather than by path.",
    "Bees communicate the location of flowers to each other with a waggle dance.",
    "The speed of light in a vacuum is about 299,792 kilometres per second.",
    "Cosine similarity between two unit vectors equals their dot product.",
    "Coffee originated in Ethiopia and spread to the Arabian Peninsula in the 15th century.",
    "A GPU executes thousands of threads in parallel, which suits matrix multiplication.",
    "The Amazon rainforest produces a large share of the world's oxygen and rainfall.",
    "Parquet is a columnar file format that compresses well and supports fast column scans.",
    "Regular exercise and enough sleep both improve long-term memory.",
]

ZH = [
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "长江是中国最长的河流，全长约六千三百公里。",
    "光合作用把光能转化为储存在葡萄糖中的化学能。",
    "向量数据库保存文本的嵌入向量，并能快速完成近邻检索。",
    "珠穆朗玛峰海拔八千八百四十九米，是世界最高峰。",
    "大熊猫主要以竹子为食，生活在四川、陕西和甘肃的山区。",
    "春节是中国最重要的传统节日，家人会团聚吃年夜饭。",
    "深度学习模型通过反向传播计算梯度并更新参数。",
    "上海是中国最大的经济中心之一，拥有繁忙的国际港口。",
    "茶起源于中国，已有数千年的饮用历史。",
    "杭州西湖以秀丽的湖光山色闻名，被列入世界文化遗产。",
    "水在标准大气压下的沸点是一百摄氏度。",
    "唐朝是中国历史上国力强盛、文化繁荣的朝代之一。",
    "图形处理器可以并行执行大量线程，非常适合矩阵运算。",
    "今天天气很好，我们一起去公园散步吧。",
    "孔子是春秋时期的思想家和教育家，儒家学派的创始人。",
    "对象存储按存储桶和键来定位数据，而不是按目录路径。",
    "黄河被称为中华民族的母亲河。",
    "余弦相似度衡量两个向量方向上的接近程度。",
    "充足的睡眠和规律的运动有助于提高记忆力。",
]

CODE = [
    "def add(a: int, b: int) -> int:\n    return a + b",
    "import numpy as np\n\ndef cosine(a, b):\n    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))",
    "SELECT id, title FROM documents WHERE lang = 'en' ORDER BY id LIMIT 10;",
    "for (let i = 0; i < 10; i++) {\n  console.log(`item ${i}`);\n}",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    'fn main() {\n    let v: Vec<i32> = (1..=5).collect();\n    println!("{}", v.iter().sum::<i32>());\n}',
    "import ray\n\nray.init()\nds = ray.data.read_parquet('s3://bucket/docs/')\nprint(ds.count())",
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("hello, world")\n}',
    "with open('data.jsonl') as f:\n    rows = [json.loads(line) for line in f]",
    '#include <stdio.h>\n\nint main(void) {\n    printf("hello\\n");\n    return 0;\n}',
    "def l2_normalize(x):\n    return x / np.linalg.norm(x, axis=-1, keepdims=True)",
    "aws s3 cp ./vectors s3://my-bucket/vectors/ --recursive",
    (
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, x):\n        self.items.append(x)"
    ),
    "CREATE TABLE docs (id BIGINT PRIMARY KEY, text TEXT, embedding FLOAT[1024]);",
    "const sum = (xs) => xs.reduce((a, b) => a + b, 0);",
    "import torch\n\nx = torch.randn(4, 8, device='cuda', dtype=torch.bfloat16)\ny = x @ x.T",
    (
        "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    p, *rest = xs\n"
        "    return quicksort([x for x in rest if x < p]) + [p] + quicksort([x for x in rest if x >= p])"
    ),
    "kubectl get pods -n ray -l ray.io/node-type=worker",
    "import pyarrow.parquet as pq\n\ntable = pq.read_table('vectors.parquet', columns=['id', 'embedding'])",
    (
        "public static int max(int[] xs) {\n    int m = xs[0];\n"
        "    for (int x : xs) m = Math.max(m, x);\n    return m;\n}"
    ),
]

QUERIES = [
    {"id": 1, "text": "What is the capital of China?"},
    {"id": 2, "text": "How do plants turn sunlight into energy?"},
    {"id": 3, "text": "中国最长的河流是哪一条？"},
    {"id": 4, "text": "python function to normalize vectors to unit length"},
    {"id": 5, "text": "How fast does light travel?"},
]

SHARDS = ("docs-000.jsonl", "docs-001.jsonl.gz", "docs-002.parquet")
PER_SHARD = 20


def make_docs() -> list[dict]:
    """60 rows, interleaving the three languages so that every shard holds all of them."""
    pools = {"en": EN, "zh": ZH, "code": CODE}
    docs = []
    for i in range(len(EN) + len(ZH) + len(CODE)):
        lang = ("en", "zh", "code")[i % 3]
        text = pools[lang][i // 3]
        docs.append({"id": i, "text": text, "lang": lang, "url": f"https://example.com/{lang}/{i:04d}"})
    return docs


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_corpus(out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    docs = make_docs()
    paths = []
    for k, name in enumerate(SHARDS):
        rows = docs[k * PER_SHARD : (k + 1) * PER_SHARD]
        path = os.path.join(out, name)
        if name.endswith(".jsonl"):
            with open(path, "wb") as f:
                f.write(_jsonl(rows))
        elif name.endswith(".jsonl.gz"):
            with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                gz.write(_jsonl(rows))
        else:
            schema = pa.schema(
                [("id", pa.int64()), ("text", pa.string()), ("lang", pa.string()), ("url", pa.string())]
            )
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
        paths.append(path)
    return paths


def write_queries(path: str) -> str:
    with open(path, "wb") as f:
        f.write(_jsonl(QUERIES))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "corpus"), help="corpus directory (default: examples/corpus)")
    p.add_argument("--queries", default=os.path.join(HERE, "queries.jsonl"), help="queries file to write")
    args = p.parse_args()
    for path in [*write_corpus(args.out), write_queries(args.queries)]:
        print(f"{path}  {os.path.getsize(path):,} bytes")


if __name__ == "__main__":
    main()
